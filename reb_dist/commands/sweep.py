"""`reb sweep` (and jobs/sweep.py under `ray job submit`): a sweep's cells run as Ray tasks
(reb_dist.distributed.sweep), kept and resumable.

A finished cell is a file `cells/<cell>.json` written atomically, and a line in `done.log`; a
resubmitted sweep skips every cell that has its file, so an interrupted sweep redoes only the cells
that were running. MLflow is written from the driver only (parallel writers race on a sqlite store):
one parent run per submission, one nested run per (cell, method). A stopped job (SIGTERM) ends its
run FAILED; runs a killed job left RUNNING are closed FAILED by the next submission. One submission
runs into an output folder at a time (`<out>/.sweep.lock`): a second is refused at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from dataclasses import asdict
from pathlib import Path

from reb_dist.distributed.runtime import terminated
from reb_dist.distributed.sweep import Sweep, run_cells
from reb_dist.io.atomic import run_alone, write_text_atomic
from reb_dist.io.tracking import SweepLog, legacy_mode
from reb_dist.reporting.tables import mode_footnote, results_table_markdown, to_csv

log = logging.getLogger(__name__)


def run_sweep(sweep: Sweep, out_dir: str | Path, tracking_uri: str | None = None,
              experiment: str = "reb-dist-sweeps") -> dict[str, dict]:
    """Run every cell not yet done; returns {cell id: result} for all cells (done before or now).

    Raises:
        RebError: another submission is running into `out_dir` now.
    """
    out = Path(out_dir).absolute()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    # two at once both ran every cell (done.log listed each twice), and the second marked the first's
    # MLflow run FAILED while it ran
    with run_alone(out / ".sweep.lock", f"{out}: another sweep is running into this folder now; wait for it "
                   f"(the same command then runs only what is left), or give --out another folder"):
        return _run_sweep(sweep, out, tracking_uri, experiment)


def _run_sweep(sweep: Sweep, out: Path, tracking_uri: str | None, experiment: str) -> dict[str, dict]:
    """`run_sweep`'s work, with the folder's lock held."""
    done = {c.id for c in sweep.cells if (out / "cells" / f"{c.id}.json").is_file()}
    todo = [c for c in sweep.cells if c.id not in done]
    log.info("sweep %s: %d cells, %d done before, %d to run -> %s", sweep.name, len(sweep.cells), len(done),
             len(todo), out)
    store = SweepLog(tracking_uri or f"sqlite:///{out / 'mlflow.db'}", experiment, sweep.name,
                     {"name": sweep.name, "base": sweep.base, "methods": sweep.methods,
                      "cells": [asdict(c) for c in sweep.cells]}, str(out))
    # `ray job stop` sends SIGTERM: turn it into an exception so the MLflow run ends FAILED, but only
    # between cells: a cell's MLflow runs, file and done.log line are kept together or not at all
    stop = _DeferredStop()
    previous = signal.signal(signal.SIGTERM, stop.handle)
    cells = run_cells(sweep, todo, out)
    try:
        for cell, cell_result in cells:
            result = {"cell": asdict(cell), **cell_result}
            mode = cell_mode(result)
            with stop.deferred():
                cell_cfg = sweep.cell_config(cell, out)  # every resolved setting, as benchmark children have
                store.log_cell(cell.id, {"dataset": cell.dataset, "category": cell.category,
                                         "backbone": cell.backbone, "preset": cell_cfg.preset, "mode": mode},
                               {**cell_cfg.flat(), "bank_size": result["bank_size"], "mode": mode},
                               result["methods"])
                write_text_atomic(out / "cells" / f"{cell.id}.json", json.dumps(result, indent=1, default=float))
                with open(out / "done.log", "a") as fh:  # one line per completed cell, ever
                    fh.write(f"{cell.id}\n")
        results = {c.id: json.loads((out / "cells" / f"{c.id}.json").read_text()) for c in sweep.cells}
        _write_summary(sweep, out, results)
        store.close("FINISHED")
        return results
    except BaseException:
        store.close("FAILED")
        raise
    finally:
        cells.close()  # a Ray the cells started is shut down, also when the sweep stops early
        signal.signal(signal.SIGTERM, previous)


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


class _DeferredStop:
    """A SIGTERM handler that raises `Terminated` at once, or, inside `deferred()`, when it ends."""

    def __init__(self):
        self.holding = False
        self.received: int | None = None

    def handle(self, signum, frame):
        if self.holding:
            self.received = signum
        else:
            raise terminated(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.received is not None:
            raise terminated(self.received)


def cell_mode(result: dict) -> str:
    """A cell's search mode: its own, or for a cell file written before cells recorded one, the mode
    its preset computed (`legacy_mode`: "fast" was coreset densities; no preset at all, exact)."""
    return result.get("mode") or legacy_mode({"preset": result.get("preset", "exact")})


def _write_summary(sweep: Sweep, out: Path, results: dict[str, dict]) -> None:
    """summary.md and summary.csv: one row per (cell, method), with its search mode and, for an
    approximate cell, the recall of each search against exact."""
    metrics = ("image_auroc", "pixel_auroc", "aupro")
    recalls = [k for k in ("query_recall", "density_recall")
               if any(k in m for cell in sweep.cells for m in results[cell.id]["methods"].values())]
    rows = [{"dataset": cell.dataset, "category": cell.category, "backbone": cell.backbone, "method": method,
             "mode": cell_mode(results[cell.id]), **{k: m.get(k, float("nan")) for k in metrics},
             **{k: m[k] for k in recalls if k in m}}
            for cell in sweep.cells for method, m in results[cell.id]["methods"].items()]
    columns = ["dataset", "category", "backbone", "method", "mode", *metrics, *recalls]
    note = mode_footnote(rows)
    write_text_atomic(out / "summary.md", results_table_markdown(rows, columns) + (f"\n{note}\n" if note else ""))
    write_text_atomic(out / "summary.csv", to_csv([{k: (f"{v:.6f}" if isinstance(v, float) else v)
                                                     for k, v in r.items()} for r in rows], columns))
