"""A sweep's cells as Ray tasks: datasets x categories x backbones, every method scored per cell.

A cell is one (dataset, category, backbone); its methods share one bank and one search. Cells run
as Ray tasks on whatever cluster the driver is connected to (`ray job submit` sets RAY_ADDRESS), at
most `max_concurrent` at once. What is kept of them (cell files, done.log, MLflow, the summary, and
resuming) is `reb sweep`'s: reb_dist.commands.sweep.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reb_dist.config import RunConfig, apply_override, config_file
from reb_dist.errors import ConfigError
from reb_dist.distributed.runtime import ray_session

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
        path = config_file(path, "sweep file")
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
    return {"category": category, "backbone": cfg.backbone.name, "preset": cfg.preset, "mode": result.search_mode,
            "bank_size": result.bank_size,
            "seconds": time.perf_counter() - start, "timings": result.timings,
            "methods": {m.method.label: m.metrics for m in result.methods}}


def run_cells(sweep: Sweep, todo: list[Cell], out_dir: str | Path) -> Iterator[tuple[Cell, dict]]:
    """Run `todo`'s cells as Ray tasks, at most `sweep.max_concurrent` at once, on the cluster the
    driver is connected to (a local Ray when none); yields (cell, its result) as each finishes."""
    import ray
    from reb_dist.progress import progress_bar

    with ray_session():
        task = ray.remote(num_cpus=sweep.cpus_per_cell, max_retries=1)(run_cell)
        pending: dict = {}
        queue = list(todo)
        bar = progress_bar(total=len(todo), desc=f"sweep {sweep.name}", unit="cell")
        while queue or pending:
            while queue and len(pending) < sweep.max_concurrent:
                cell = queue.pop(0)
                pending[task.remote(sweep.cell_config(cell, out_dir), cell.category)] = cell
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            yield cell, ray.get(ready[0])
            bar.update()
        bar.close()
