"""Result files of a run: the table (printed, markdown, JSON), ROC curves, heatmap galleries, and
predictions (overlays + scores.csv), each logged to MLflow through the run's tracker."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from reb_dist.config import RunConfig
from reb_dist.core.thresholds import Calibration, normalise
from reb_dist.errors import DatasetError
from reb_dist.io.atomic import copy_atomic, file_lock, write_text_atomic
from reb_dist.io.data import read_image, sample_mask
from reb_dist.reporting.plots import (OverlayCaption, annotated_overlay, heatmap_grid, heatmap_overlay,
                                      plot_roc_curves, save_png)
from reb_dist.reporting.tables import mode_footnote, results_table_markdown, results_table_text, to_csv

from reb_dist.results import CategoryResult, Prediction

if TYPE_CHECKING:  # a type only
    from reb_dist.io.tracking import Tracker

log = logging.getLogger(__name__)
METRIC_COLUMNS = ["image_auroc", "pixel_auroc", "aupro", "image_f1"]
RESULT_COLUMNS = ["category", "method", "mode", *METRIC_COLUMNS, "seconds"]
# recall@K against exact of the test-patch search and of the density self-search: approximate runs only
RECALL_COLUMNS = ["query_recall", "density_recall"]


def result_rows(results: list[CategoryResult]) -> list[dict]:
    """One table row per (category, method): its search mode (so rows of different modes are never
    read as one figure), the metrics, the seconds of search + scoring, and the recall against exact of
    each search that was approximate."""
    rows = []
    for r in results:
        for m in r.methods:
            seconds = r.timings.get("search", 0) + r.timings.get(f"score:{m.method.label}", 0)
            row = {"category": r.category, "method": r.label(m.method), "mode": r.search_mode,
                   **{k: m.metrics.get(k, float("nan")) for k in METRIC_COLUMNS},
                   "seconds": int(round(seconds))}
            row.update({k: m.metrics[k] for k in RECALL_COLUMNS if k in m.metrics})
            rows.append(row)
    return rows


def columns_of(rows: list[dict]) -> list[str]:
    """The table's columns: the standard ones, and each recall that any row measured."""
    return RESULT_COLUMNS + [k for k in RECALL_COLUMNS if any(k in r for r in rows)]


def with_footnote(table: str, rows: list[dict]) -> str:
    """A table with the footnote its rows' modes need (`mode_footnote`), if any."""
    note = mode_footnote(rows)
    return table + (f"\n{note}\n" if note else "")


def write_results(results: list[CategoryResult], out: Path, tracker: Tracker, command_line: str,
                  config: RunConfig, name: str, wall: float | None = None, resolved: dict | None = None) -> list[dict]:
    """Print the table; write results.md, results.json, config.yaml and plots to this run's folder
    `out/runs/<time>-<id>/`, copy them to `out` (where readers look: the latest run's); log them.

    Runs writing to one `out` at once (two benchmarks in one folder) each keep their own folder; the
    copies in `out` are the set of one run, the last to finish (copied under the lock file
    `out/.results.lock`), and its results.json names that run's folder (key "run").

    Args:
        results: every category's result.
        out: the folder to write to (created).
        tracker: the run's MLflow tracker (a no-op when tracking is off).
        command_line: the command that made the results, quoted in the files.
        config: the run's settings, stored in results.json and config.yaml.
        name: the command name, used in MLflow artefact names.
        wall: the run's wall time in seconds, if known.
        resolved: settings the run resolved on its way (e.g. a loaded model's), stored beside `config`.

    Returns:
        The table rows.
    """
    rows = result_rows(results)
    # the time orders the folders; the random part keeps runs started in the same second apart
    run = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder = out / run
    folder.mkdir(parents=True)
    print()
    columns = columns_of(rows)
    print(with_footnote(results_table_text(rows, columns), rows))
    markdown = with_footnote(results_table_markdown(rows, columns), rows)
    modes = ", ".join(dict.fromkeys(r.search_mode for r in results))
    footer = (f"\n\nCommand: `{command_line}`  \nPreset: {config.preset} (mode: {modes})"
              + (f"  \nWall time: {wall:.0f} s" if wall else "") + f"  \nRun folder: {run}\n")
    files = [write_text_atomic(folder / "results.md", markdown + footer)]
    payload = {"command": command_line, "run": run, "wall_seconds": wall, "config": config.to_dict(),
               "results": [{"category": r.category, "method": r.label(m.method), "mode": r.search_mode,
                            "metrics": m.metrics, "timings": r.timings, "bank_size": r.bank_size}
                           for r in results for m in r.methods]}
    if resolved:
        payload["resolved"] = resolved
    files.append(write_text_atomic(folder / "results.json", json.dumps(payload, indent=2, default=float)))
    write_text_atomic(folder / "config.yaml", config.to_yaml())
    files.append(folder / "config.yaml")
    tracker.log_text(markdown + footer, f"{name}_results.md")
    tracker.log_table(rows, f"{name}_results.json")
    gallery = [class_gallery(results, folder / "heatmaps_classes.png")] if len(results) > 1 else []
    for path in [p for r in results for p in category_plots(r, folder)] + [p for p in gallery if p]:
        tracker.log_artifact(path, "plots")
        files.append(path)
    with file_lock(out / ".results.lock"):  # so the latest files in `out` are all one run's
        for path in files:
            copy_atomic(path, out / path.name)
    if wall is not None:
        log.info(f"wall time {wall:.0f} s; results in {out}/results.md (this run's: {folder}/)")
    return rows


def category_plots(result: CategoryResult, out: Path) -> list[Path]:
    """ROC curves of every method, and a heatmap gallery of the first method's example maps."""
    name = f"{result.category}{'_' + result.variant if result.variant else ''}"
    paths = []
    if len(np.unique(result.labels)) == 2:  # a ROC curve needs normal and anomalous test images
        paths.append(plot_roc_curves({result.label(m.method): (result.labels, m.image_scores)
                                      for m in result.methods}, out / f"roc_{name}.png", title=f"{name}: image ROC"))
    else:
        log.warning(f"{name}: no ROC curve: the test set has only {'anomalous' if result.labels.all() else 'normal'} "
                    "images, so image AUROC and the ROC are undefined")
    first = result.methods[0]
    if first.examples:
        items = []
        for i, pixel_map in first.examples:
            sample = result.split.test[i]
            image, mask = _example_image(result, i)
            items.append((f"{sample.defect_type} {sample.image_path.stem} {first.image_scores[i]:.3g}",
                          image, pixel_map, mask))
        maps = np.stack([m for _, m in first.examples])
        paths.append(heatmap_grid(items, out / f"heatmaps_{name}.png",
                                  vmin=float(maps.min()), vmax=float(maps.max())))
    return paths


def _example_image(result: CategoryResult, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Test image `index` at the result's image size (RGB uint8), and its mask if it has one."""
    sample, size = result.split.test[index], result.image_size
    image = np.asarray(Image.fromarray(read_image(sample.image_path)).resize((size, size), Image.BICUBIC))
    return image, sample_mask(sample, size) if sample.mask_path is not None else None


def class_gallery(results: list[CategoryResult], path: Path, per_class: int = 2) -> Path | None:
    """The first method's maps of the top-scoring defective examples of every category, side by side.

    Scores and maps of different classes have different scales, so each class's maps are divided by
    the largest value among that class's examples (colour 1 = the class's hottest patch shown). None
    when no category kept a defective example.
    """
    items = []
    for result in results:
        first = result.methods[0]
        defective = [(i, m) for i, m in first.examples if result.labels[i]]
        defective.sort(key=lambda item: -first.image_scores[item[0]])
        if not defective:
            continue
        scale = max(float(m.max()) for _, m in defective) or 1.0
        for i, pixel_map in defective[:per_class]:
            sample = result.split.test[i]
            image, mask = _example_image(result, i)
            name = f"{result.category}{' ' + result.variant if result.variant else ''}"
            items.append((f"{name}: {sample.defect_type} {sample.image_path.stem}", image, pixel_map / scale, mask))
    if not items:
        return None
    return heatmap_grid(items, path, vmin=0.0, vmax=1.0, ncols=min(len(items), 4))


def overlay_caption(p: Prediction, flagged: bool | None, threshold: float | None,
                    calibration: Calibration | None) -> OverlayCaption:
    """The caption of one prediction's overlay: score, threshold and verdict, what the colours mean,
    where the threshold sits on them, and the nearest training patch (its image read if it can be)."""
    if calibration is not None:
        scale = "pixel scores normalised by the model's calibration (0.5 = threshold), the same in every run"
        bar = None if threshold is None else float(normalise(threshold, calibration))
    else:
        scale, bar = "raw pixel scores, one scale for every image of this run", threshold
    h, w = p.image.shape[:2]
    caption = OverlayCaption(score=p.score, threshold=threshold, flagged=flagged, scale=scale, bar_threshold=bar)
    n = p.nearest
    if n is None:
        return caption
    # the file's last folders name it well enough under the image; scores.csv has the full path
    name = str(Path(*Path(n.train_image).parts[-4:])) if n.train_image else f"training image {n.train_index}"
    try:
        train = read_image(n.train_image) if n.train_image else None
    except (DatasetError, OSError):  # moved or deleted since the fit: named, not shown
        train = None
    return replace(caption, hot_box=n.box(n.cell, w, h),
                   nearest=f"{name}, row {n.train_cell[0]} col {n.train_cell[1]} of {n.grid[0]}x{n.grid[1]}, "
                           f"distance {n.distance:.4g}",
                   nearest_image=train,
                   nearest_box=None if train is None else n.box(n.train_cell, train.shape[1], train.shape[0]))


def write_predictions(predictions: list[Prediction], out: Path, threshold: float | None = None,
                      calibration: Calibration | None = None) -> list[dict]:
    """A heatmap overlay per scored image (one colour scale for all) and scores.csv; returns the CSV
    rows (a scored one also names its `overlay` file).

    Args:
        predictions: from `reb_dist.pipelines.predict.predict`.
        out: the folder to write into.
        threshold: flags images whose prediction has no `anomalous` yet (score >= threshold).
        calibration: the model's; overlays then show `normalise` of each pixel map on the fixed
            scale 0..1 (0.5 = the image threshold), comparable across runs. Without one, the
            scale is the min..max of this run's maps.

    Overlays are named `<stem>_heatmap.png`; an image whose stem is already taken (a/x.png after
    b/x.png) gets `<stem>-2_heatmap.png` (-3, ...), so no overlay overwrites another.

    scores.csv has columns image (the path as given), score, then normalised_score and anomalous
    when every scored prediction has them; hot_patch (row col of the hottest patch on the feature
    grid), nearest_train_image, nearest_train_patch and nearest_distance when the model knows its
    bank's provenance; overlay when a name had to be made unique, and error when an image could
    not be scored (its row has an empty score and the problem).

    Each overlay is annotated (`annotated_overlay`): colour bar with the threshold, score and verdict,
    the hottest patch boxed and, beside it, the nearest training image with the matched patch boxed.
    """
    out.mkdir(parents=True, exist_ok=True)
    scored = [p for p in predictions if p.error is None]
    if calibration is not None:
        vmin, vmax = 0.0, 1.0  # the calibrated scale: the same colours mean the same score everywhere
    elif scored:
        # One colour scale for every overlay of the run, so heatmaps compare across images.
        vmin = min(float(p.pixel_map.min()) for p in scored)
        vmax = max(float(p.pixel_map.max()) for p in scored)
    # the threshold flags were taken with: the one given, else the calibration's (as predict does)
    used = threshold if threshold is not None else calibration.threshold if calibration is not None else None
    flags = [p.anomalous if p.anomalous is not None else (None if threshold is None else p.score >= threshold)
             for p in predictions]
    has_flags = bool(scored) and all(f is not None for p, f in zip(predictions, flags) if p.error is None)
    has_normalised = bool(scored) and all(p.normalised_score is not None for p in scored)
    taken: set[str] = set()  # lower case: two names differing in case are one file on macOS/Windows
    renamed = False
    rows = []
    for p, flag in zip(predictions, flags):
        row = {"image": str(p.path)}
        if p.error is not None:
            rows.append({**row, "error": p.error})
            continue
        stem, n = p.path.stem, 1
        while (name := f"{stem}{'' if n == 1 else f'-{n}'}_heatmap.png").lower() in taken:
            n += 1
        taken.add(name.lower())
        renamed |= n > 1
        full = p.input_map()
        if calibration is not None:
            full = normalise(full, calibration).astype(np.float32)
        overlay = heatmap_overlay(p.image, full, vmin=vmin, vmax=vmax)
        save_png(annotated_overlay(overlay, vmin, vmax, overlay_caption(p, flag, used, calibration)), out / name)
        row.update(score=f"{p.score:.6g}", overlay=name)
        if has_normalised:
            row["normalised_score"] = f"{p.normalised_score:.6g}"
        if has_flags:
            row["anomalous"] = int(flag)
        if p.nearest is not None:
            near = p.nearest
            row.update(hot_patch=f"{near.cell[0]} {near.cell[1]}",
                       nearest_train_image=near.train_image or near.train_index,
                       nearest_train_patch=f"{near.train_cell[0]} {near.train_cell[1]}",
                       nearest_distance=f"{near.distance:.6g}")
        rows.append(row)
    nearest = ["hot_patch", "nearest_train_image", "nearest_train_patch", "nearest_distance"] \
        if any(p.nearest is not None for p in scored) else []
    columns = (["image", "score"] + (["normalised_score"] if has_normalised else [])
               + (["anomalous"] if has_flags else []) + nearest + (["overlay"] if renamed else [])
               + (["error"] if len(scored) < len(predictions) else []))
    write_text_atomic(out / "scores.csv", to_csv(rows, columns))
    return rows
