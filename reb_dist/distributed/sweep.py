"""A sweep: datasets x categories x backbones, every method scored per cell, resumable.

A cell is one (dataset, category, backbone); its methods share one bank and one search. Cells run
as Ray tasks on whatever cluster the driver is connected to (`ray job submit` sets RAY_ADDRESS),
at most `max_concurrent` at once. A finished cell is a file `cells/<cell>.json` written atomically,
and a line in `done.log`; a resubmitted sweep skips every cell that has its file, so an interrupted
sweep redoes only the cells that were running. MLflow is written from the driver only (parallel
writers race on a sqlite store): one parent run per submission, one nested run per (cell, method).
A stopped job (SIGTERM) ends its run FAILED; runs a killed job left RUNNING are closed FAILED by the
next submission.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from reb_dist.config import RunConfig, apply_override
from reb_dist.errors import ConfigError
from reb_dist.io.atomic import write_text_atomic
from reb_dist.io.tracking import SweepLog
from reb_dist.reporting.tables import results_table_markdown, to_csv

log = logging.getLogger(__name__)


@dataclass
class Cell:
    """One (dataset, category, backbone) of a sweep; its methods share one bank and one search."""

    dataset: str
    root: str
    layout: str
    category: str
    backbone: str
    overrides: list[str] = field(default_factory=list)  # the dataset entry's `set:` list

    @property
    def id(self) -> str:
        """Unique in a sweep: names the cell's result file and MLflow runs."""
        return f"{self.dataset}-{self.category}-{self.backbone}"


@dataclass
class Sweep:
    """A sweep file: base settings, a grid of cells, methods, and how many cells run at once."""

    name: str
    base: dict
    cells: list[Cell]
    methods: list[str]
    max_concurrent: int = 1
    cpus_per_cell: float = 1.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        """Read and check a sweep YAML (every cell's settings are built once, so a bad one fails here)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: sweep file not found")
        spec = yaml.safe_load(path.read_text()) or {}
        unknown = set(spec) - {"name", "base", "grid", "max_concurrent", "cpus_per_cell"}
        if unknown:
            raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}")
        grid = spec.get("grid") or {}
        if not grid.get("datasets"):
            raise ConfigError(f"{path}: grid.datasets is empty")
        cells = []
        for d in grid["datasets"]:
            root = str(d["root"])
            name = d.get("name") or Path(root).name
            for category in d.get("categories") or []:
                for backbone in grid.get("backbones") or ["efficientnet_lite0"]:
                    cells.append(Cell(name, root, d.get("layout", "mvtec"), category, backbone,
                                      [str(x) for x in d.get("set") or []]))
        if len({c.id for c in cells}) != len(cells):
            raise ConfigError(f"{path}: two cells share an id; give the datasets distinct `name`s")
        sweep = cls(spec.get("name") or path.stem, spec.get("base") or {}, cells,
                    list(grid.get("methods") or ["ldknn", "knn", "nn1"]),
                    int(spec.get("max_concurrent", 1)), float(spec.get("cpus_per_cell", 1.0)))
        for cell in cells:  # a bad setting fails here, before any cluster work
            sweep.cell_config(cell, "out")
        return sweep

    def cell_config(self, cell: Cell, out_dir: str | Path) -> RunConfig:
        """The cell's settings: base, the dataset's `set:` list, then what the cell itself fixes."""
        values = json.loads(json.dumps(self.base))
        for item in cell.overrides:
            apply_override(values, item)
        data = values.setdefault("data", {})
        data.update(root=cell.root, layout=cell.layout, categories=[cell.category])
        values.setdefault("backbone", {})["name"] = cell.backbone
        values.setdefault("scoring", {})["methods"] = list(self.methods)
        values["output_dir"] = str(Path(out_dir) / "cells" / cell.id)
        values.setdefault("tracking", {})["enabled"] = False  # the driver logs; workers never open the store
        return RunConfig.from_dict(values, f"sweep {self.name}: {cell.id}")


def run_cell(cfg: RunConfig, category: str) -> dict:
    """Evaluate one cell (a Ray task body; also callable in-process); a JSON-able summary."""
    from reb_dist.pipelines.evaluate import evaluate_category

    start = time.perf_counter()
    result = evaluate_category(cfg, category)
    return {"category": category, "backbone": cfg.backbone.name, "preset": cfg.preset, "bank_size": result.bank_size,
            "seconds": time.perf_counter() - start, "timings": result.timings,
            "methods": {m.method.label: m.metrics for m in result.methods}}


def run_sweep(sweep: Sweep, out_dir: str | Path, tracking_uri: str | None = None,
              experiment: str = "reb-dist-sweeps") -> dict[str, dict]:
    """Run every cell not yet done; returns {cell id: result} for all cells (done before or now)."""
    import ray
    from tqdm.auto import tqdm

    from reb_dist.distributed.runtime import ensure_ray

    out = Path(out_dir).absolute()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    done = {c.id for c in sweep.cells if (out / "cells" / f"{c.id}.json").is_file()}
    todo = [c for c in sweep.cells if c.id not in done]
    log.info("sweep %s: %d cells, %d done before, %d to run -> %s", sweep.name, len(sweep.cells), len(done),
             len(todo), out)
    store = SweepLog(tracking_uri or f"sqlite:///{out / 'mlflow.db'}", experiment, sweep.name,
                   {"name": sweep.name, "base": sweep.base, "methods": sweep.methods,
                    "cells": [asdict(c) for c in sweep.cells]}, str(out))
    # `ray job stop` sends SIGTERM: turn it into an exception so the MLflow run ends FAILED
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    started = ensure_ray()
    try:
        task = ray.remote(num_cpus=sweep.cpus_per_cell, max_retries=1)(run_cell)
        pending: dict = {}
        queue = list(todo)
        bar = tqdm(total=len(todo), desc=f"sweep {sweep.name}", unit="cell")
        while queue or pending:
            while queue and len(pending) < sweep.max_concurrent:
                cell = queue.pop(0)
                pending[task.remote(sweep.cell_config(cell, out), cell.category)] = cell
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            result = {"cell": asdict(cell), **ray.get(ready[0])}
            store.log_cell(cell.id, {"dataset": cell.dataset, "category": cell.category, "backbone": cell.backbone},
                         {"backbone.name": cell.backbone, "bank_size": result["bank_size"], "preset": result["preset"]},
                         result["methods"])
            write_text_atomic(out / "cells" / f"{cell.id}.json", json.dumps(result, indent=1, default=float))
            with open(out / "done.log", "a") as fh:  # one line per completed cell, ever
                fh.write(f"{cell.id}\n")
            bar.update()
        bar.close()
        results = {c.id: json.loads((out / "cells" / f"{c.id}.json").read_text()) for c in sweep.cells}
        _write_summary(sweep, out, results)
        store.close("FINISHED")
        return results
    except BaseException:
        store.close("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()


def sweep_file(path: str | Path, out_dir: str | Path | None = None, tracking_uri: str | None = None,
               experiment: str = "reb-dist-sweeps") -> dict[str, dict]:
    """`reb sweep` (and jobs/sweep.py, for `ray job submit`): load the sweep file and run it.

    Args:
        path: the sweep YAML.
        out_dir: the sweep's folder (default: outputs/sweeps/<sweep name>).
        tracking_uri: the MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db).
        experiment: the MLflow experiment.

    Returns:
        {cell id: result}, as `run_sweep`.
    """
    sweep = Sweep.load(path)
    out = Path(out_dir) if out_dir else Path("outputs") / "sweeps" / sweep.name
    results = run_sweep(sweep, out, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), experiment)
    log.info("%d cells done; summary in %s", len(results), out / "summary.md")
    return results


def _raise_system_exit(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def _write_summary(sweep: Sweep, out: Path, results: dict[str, dict]) -> None:
    """summary.md and summary.csv: one row per (cell, method)."""
    rows = [{"dataset": cell.dataset, "category": cell.category, "backbone": cell.backbone, "method": method,
             **{k: m.get(k, float("nan")) for k in ("image_auroc", "pixel_auroc", "aupro")}}
            for cell in sweep.cells for method, m in results[cell.id]["methods"].items()]
    columns = ["dataset", "category", "backbone", "method", "image_auroc", "pixel_auroc", "aupro"]
    presets = sorted({results[cell.id].get("preset", "exact") for cell in sweep.cells})  # older cells: exact
    write_text_atomic(out / "summary.md", results_table_markdown(rows, columns) + f"\nPreset: {', '.join(presets)}\n")
    write_text_atomic(out / "summary.csv", to_csv([{k: (f"{v:.6f}" if isinstance(v, float) else v)
                                                     for k, v in r.items()} for r in rows], columns))
