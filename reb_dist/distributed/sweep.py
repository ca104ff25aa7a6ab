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
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reb_dist.config import RunConfig
from reb_dist.errors import ConfigError


@dataclass
class Cell:
    dataset: str
    root: str
    layout: str
    category: str
    backbone: str
    overrides: list[str] = field(default_factory=list)  # the dataset entry's `set:` list

    @property
    def id(self) -> str:
        return f"{self.dataset}-{self.category}-{self.backbone}"


@dataclass
class Sweep:
    name: str
    base: dict
    cells: list[Cell]
    methods: list[str]
    max_concurrent: int = 1
    cpus_per_cell: float = 1.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
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
        from reb_dist.config import _set_dotted

        values = json.loads(json.dumps(self.base))
        for item in cell.overrides:
            _set_dotted(values, item)
        cfg = RunConfig.from_dict(values, f"sweep {self.name}: {cell.id}")
        cfg.data.root, cfg.data.layout, cfg.data.categories = cell.root, cell.layout, [cell.category]
        cfg.backbone.name = cell.backbone
        cfg.scoring.methods = list(self.methods)
        cfg.output_dir = str(Path(out_dir) / "cells" / cell.id)
        cfg.tracking.enabled = False  # the driver logs; workers never open the store
        return cfg


def run_cell(cfg: RunConfig, category: str) -> dict:
    """Evaluate one cell (a Ray task body; also callable in-process)."""
    from reb_dist.pipelines.evaluate import evaluate_category

    start = time.perf_counter()
    result = evaluate_category(cfg, category)
    return {"category": category, "backbone": cfg.backbone.name, "bank_size": result.bank_size,
            "seconds": time.perf_counter() - start, "timings": result.timings,
            "methods": {m.method.label: m.metrics for m in result.methods}}


def _write_json(path: Path, payload: dict) -> None:
    from reb_dist.reporting.plots import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=1, default=float))


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
    print(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(done)} done before, {len(todo)} to run -> {out}")
    mlflow_run = _open_parent_run(sweep, out, tracking_uri or f"sqlite:///{out / 'mlflow.db'}", experiment)
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
            result = {"cell": cell.__dict__, **ray.get(ready[0])}
            _log_cell(mlflow_run, cell, result)
            _write_json(out / "cells" / f"{cell.id}.json", result)
            with open(out / "done.log", "a") as fh:  # one line per completed cell, ever
                fh.write(f"{cell.id}\n")
            bar.update()
        bar.close()
        results = {c.id: json.loads((out / "cells" / f"{c.id}.json").read_text()) for c in sweep.cells}
        _write_summary(sweep, out, results)
        _close_parent_run(mlflow_run, "FINISHED")
        return results
    except BaseException:
        _close_parent_run(mlflow_run, "FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()


def _raise_system_exit(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def _open_parent_run(sweep: Sweep, out: Path, uri: str, experiment: str):
    """(client, run id) of this submission's parent run; closes runs a killed submission left open."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    stale = client.search_runs([exp_id], f"tags.sweep = '{sweep.name}' and attributes.status = 'RUNNING'")
    for run in stale:
        client.set_terminated(run.info.run_id, "FAILED")
    run = client.create_run(exp_id, run_name=f"sweep-{sweep.name}",
                            tags={"sweep": sweep.name, "kind": "sweep", "output": str(out)})
    client.log_text(run.info.run_id, yaml.safe_dump({"name": sweep.name, "base": sweep.base,
                                                     "methods": sweep.methods,
                                                     "cells": [c.__dict__ for c in sweep.cells]}), "sweep.yaml")
    return client, run.info.run_id, exp_id, sweep.name


def _log_cell(mlflow_run, cell: Cell, result: dict) -> None:
    """One FINISHED nested run per method of the cell, logged in one batch each."""
    from mlflow.entities import Metric, Param

    from reb_dist.io.tracking import _metric_name

    client, parent, exp_id, sweep_name = mlflow_run
    now = int(time.time() * 1000)
    for method, metrics in result["methods"].items():
        run = client.create_run(exp_id, run_name=f"{cell.id}/{method}", tags={
            "mlflow.parentRunId": parent, "sweep": sweep_name, "kind": "cell", "dataset": cell.dataset,
            "category": cell.category, "backbone": cell.backbone, "method": method})
        client.log_batch(run.info.run_id,
                         metrics=[Metric(_metric_name(k), float(v), now, 0) for k, v in metrics.items()],
                         params=[Param("backbone.name", cell.backbone), Param("method", method),
                                 Param("bank_size", str(result["bank_size"]))])
        client.set_terminated(run.info.run_id, "FINISHED")


def _close_parent_run(mlflow_run, status: str) -> None:
    client, parent, _, _ = mlflow_run
    client.set_terminated(parent, status)


def _write_summary(sweep: Sweep, out: Path, results: dict[str, dict]) -> None:
    lines = ["| dataset | category | backbone | method | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---:|---:|---:|"]
    csv = ["dataset,category,backbone,method,image_auroc,pixel_auroc,aupro"]
    for cell in sweep.cells:
        for method, m in results[cell.id]["methods"].items():
            vals = [m.get(k, float("nan")) for k in ("image_auroc", "pixel_auroc", "aupro")]
            lines.append(f"| {cell.dataset} | {cell.category} | {cell.backbone} | {method} | "
                         + " | ".join(f"{100 * v:.1f}" for v in vals) + " |")
            csv.append(f"{cell.dataset},{cell.category},{cell.backbone},{method}," + ",".join(f"{v:.6f}" for v in vals))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.csv").write_text("\n".join(csv) + "\n")
