"""How fine-tuning's gain grows with training: every checkpoint's backbone scored on the test set.

`reb finetune --set finetune.evaluate_checkpoints=true` keeps every checkpoint and, after training,
fits the configured methods (e.g. ldknn = REB, knn = DefectMaker+KNN) with each checkpoint's
backbone, and with the start weights as step 0; the curve goes to MLflow (one metric per method,
step = images seen), to learning_curve.json and to learning_curve.png next to the SSL accuracies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from reb_dist.config import RunConfig
from reb_dist.io.atomic import write_text_atomic
from reb_dist.pipelines.ssl_training import BACKBONE_FILE, complete_checkpoints

log = logging.getLogger(__name__)

CURVE_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def checkpoint_backbones(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, backbone file) of every complete checkpoint under `run_dir`, by step."""
    return [(step, folder / BACKBONE_FILE) for step, folder in sorted(complete_checkpoints(run_dir).items())]


def evaluate_checkpoints(cfg: RunConfig, category: str, run_dir: Path, ssl_metrics: list[dict],
                         tracker=None, placement=None) -> list[dict]:
    """Score the category's test set with the start weights and every checkpoint's backbone.

    Args:
        cfg: the fine-tuning run's settings (its scoring, bank and preset are what is evaluated).
        category: the class fine-tuned on.
        run_dir: the run folder holding the checkpoints.
        ssl_metrics: the run's per-step metrics (`read_metrics`), for images seen per step.
        tracker: the run's MLflow tracker (metrics "curve/<method>/<metric>" at step = images seen).
        placement: where each checkpoint's bank is indexed (`reb_dist.pipelines.bank.BankPlacement`).

    Returns:
        One row per (checkpoint, method): step, images_seen, method and its metrics.
    """
    from reb_dist.pipelines.evaluate import evaluate_category, load_category

    seen = {int(m["step"]): int(m.get("images_seen", 0)) for m in ssl_metrics}
    split = load_category(cfg.data, category)
    rows = []
    for step, weights in [(0, cfg.backbone.weights)] + checkpoint_backbones(run_dir):
        scored = replace(cfg, backbone=replace(cfg.backbone, weights=str(weights) if weights else None,
                                               finetuned=None))
        result = evaluate_category(scored, category, split=split, placement=placement)
        for m in result.methods:
            row = {"step": step, "images_seen": seen.get(step, 0), "method": m.method.label,
                   **{k: m.metrics[k] for k in CURVE_METRICS if k in m.metrics}}
            rows.append(row)
            if tracker is not None:
                tracker.log_metrics({f"curve/{m.method.name}/{k}": v for k, v in row.items() if k in CURVE_METRICS},
                                    step=row["images_seen"])
        log.info("%s step %d: %s", category, step, ", ".join(
            f"{m.method.label} {100 * m.metrics.get('image_auroc', float('nan')):.1f}" for m in result.methods))
    return rows


def write_curve(rows: list[dict], ssl_metrics: list[dict], folder: Path, title: str) -> list[Path]:
    """learning_curve.json (the rows and the SSL metrics) and learning_curve.png; returns the paths."""
    from reb_dist.reporting.curves import learning_curve_plot

    folder.mkdir(parents=True, exist_ok=True)
    data = write_text_atomic(folder / "learning_curve.json",
                             json.dumps({"checkpoints": rows, "ssl": ssl_metrics}, indent=1))
    return [data, learning_curve_plot(rows, ssl_metrics, folder / "learning_curve.png", title)]


def write_confusion(ssl_metrics: list[dict], class_names: list[str], folder: Path, title: str) -> list[Path]:
    """ssl_confusion.json and ssl_confusion.png: which DefectMaker classes the SSL head mistakes for
    which, early and late in training; nothing when the metrics hold no confusion matrix."""
    from reb_dist.reporting.curves import confusion_plot, confusion_windows

    windows = confusion_windows(ssl_metrics)
    if not windows:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    data = write_text_atomic(folder / "ssl_confusion.json",
                             json.dumps({"class_names": class_names, "windows": windows}, indent=1))
    return [data, confusion_plot(windows, class_names, folder / "ssl_confusion.png", title)]
