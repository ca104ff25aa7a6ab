"""`reb tune`: per-class settings of LDKNN's image score and anomaly map, chosen on a validation split.

The searches themselves are the Ray layer's (`reb_dist.distributed.tuning`: Ray Tune + Optuna over
a class's neighbour table); this module runs them per class (`search_class`) and keeps the record
(`record_class`, `reported_rows`, `run_tune`): the MLflow runs, the Pareto plots, the reported test
metrics of every variant, selection.json/csv, splits.json, results.md and config.yaml under
<output_dir>/tune/.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from reb_dist.commands.placement import bank_placement
from reb_dist.config import RunConfig
from reb_dist.core.thresholds import Calibration
from reb_dist.distributed.runtime import ray_session
from reb_dist.distributed.tuning import search_k_alpha, search_map, search_pareto
from reb_dist.io.atomic import write_text_atomic
from reb_dist.io.tracking import Tracker
from reb_dist.pipelines.selection import (ClassTables, Selection, class_tables, global_choice, global_map_choice,
                                          reported_metrics, validation_calibration, write_selection)
from reb_dist.reporting.plots import pareto_plot, save_figure
from reb_dist.reporting.tables import mode_footnote, results_table_markdown, results_table_text

log = logging.getLogger(__name__)


def search_class(c: ClassTables, cfg: RunConfig, mlflow_parent: str | None = None) -> tuple[Selection, dict]:
    """One class's searches (image (K, alpha); the map's setting and, with tune.multi_objective, the
    coupled Pareto search, when the validation images have masks) and the image threshold.

    Returns:
        (the class's Selection, the Pareto search's trials and reference: {} without one).
    """
    s = search_k_alpha(c, cfg.tune, cfg.scoring, cfg.tracking, cfg.backbone.name, mlflow_parent)
    calibration = validation_calibration(c, s.k, s.alpha, cfg.tune, cfg.scoring)
    if calibration.warning():
        log.warning(f"{c.category}: {calibration.warning()}")
    s.calibration = calibration.to_dict()
    if cfg.tune.map_trials and c.val_pixel_masks is not None:
        s.map, s.map_val_metrics, s.map_trials = search_map(c, cfg.tune, cfg.scoring, cfg.tracking,
                                                            cfg.backbone.name, mlflow_parent)
    pareto: dict = {}
    if cfg.tune.multi_objective and c.val_pixel_masks is not None:
        trials, s.pareto, s.pareto_choice, reference = search_pareto(c, cfg.tune, cfg.scoring, cfg.tracking,
                                                                     cfg.backbone.name, mlflow_parent)
        pareto = {"trials": trials, "reference": reference}
    s.held_out_train = list(c.split.get("held_out_train", []))
    return s, pareto


def record_class(tracker: Tracker, c: ClassTables, s: Selection, pareto: dict, cfg: RunConfig) -> None:
    """A class's choice in its MLflow run: params, validation metrics, split, and the Pareto plot
    with its data (`describe` gives the line tune_classes logs)."""
    params = {"selected.k": s.k, "selected.alpha": s.alpha, "validation": cfg.tune.validation,
              "selected.threshold": s.calibration["threshold"], "mode": c.search_mode}
    if s.map is not None:
        params["selected.map_method"] = s.map.spec
    if pareto:
        if s.pareto_choice is not None:
            params.update({"selected.pareto_k": s.pareto_choice["k"], "selected.pareto_alpha": s.pareto_choice["alpha"]})
        plot = save_figure(pareto_plot(pareto["trials"], s.pareto, s.pareto_choice, pareto["reference"], c.category),
                           Path(cfg.output_dir) / "tune" / f"pareto_{c.category}.png", 120)
        tracker.log_artifact(plot)
        # what `reb report` redraws the plot from
        tracker.log_text(json.dumps({"trials": pareto["trials"], "front": s.pareto, "choice": s.pareto_choice,
                                     "reference": pareto["reference"]}, indent=1), f"pareto_{c.category}.json")
    tracker.log_params(params)
    tracker.log_metrics({**s.val_metrics, **s.map_val_metrics, **Calibration.from_dict(s.calibration).metrics()})
    tracker.log_text(json.dumps(c.split, indent=1), "split.json")


def describe(s: Selection) -> str:
    """One line of what a class's searches chose."""
    return (f"{s.category}: image K={s.k}, alpha={s.alpha:.3f} (validation image AUROC "
            f"{s.val_metrics['val_image_auroc']:.4f}, {s.trials} trials); map "
            + (f"{s.map.spec} (validation pixel AUROC {s.map_val_metrics['val_map_pixel_auroc']:.4f}, "
               f"AUPRO {s.map_val_metrics['val_map_aupro']:.4f}, {s.map_trials} trials)" if s.map else "coupled")
            + (f"; Pareto K={s.pareto_choice['k']}, alpha={s.pareto_choice['alpha']:.3f} (front of "
               f"{len(s.pareto)})" if s.pareto_choice else "") + f"; {s.seconds:.0f} s")


def reported_rows(tables: list[ClassTables], selections: list[Selection], cfg: RunConfig,
                  tracker: Tracker) -> tuple[list[dict], dict]:
    """The global choice, and every variant's metrics on each class's reported test images (logged)."""
    start = time.perf_counter()
    gk, ga, gobj = global_choice(tables, cfg.tune, cfg.scoring)
    glob = {"k": gk, "alpha": ga, "mean_val_objective": gobj}
    gmap = None
    if any(s.map is not None for s in selections):
        gmap, gmap_obj = global_map_choice(tables, cfg.tune, cfg.scoring)
        glob.update(map_method=gmap.spec, mean_val_map_objective=gmap_obj)
    log.info(f"global choices: {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    rows = []
    for c, s in zip(tables, selections):
        variants = {"default": (cfg.scoring.k, cfg.scoring.alpha, None), "global": (gk, ga, None),
                    "per_class": (s.k, s.alpha, None)}
        if s.map is not None:
            variants.update(per_class_decoupled=(s.k, s.alpha, s.map), global_decoupled=(gk, ga, gmap))
        if s.pareto_choice is not None:  # coupled: its map is the same LDKNN's
            variants["per_class_pareto"] = (s.pareto_choice["k"], s.pareto_choice["alpha"], None)
        for variant, (k, a, map_setting) in variants.items():
            calibration = validation_calibration(c, k, a, cfg.tune, cfg.scoring)
            metrics = {**reported_metrics(c, k, a, cfg.scoring, map_setting, calibration), **recall_metrics(c, cfg)}
            map_spec = map_setting.spec if map_setting else ""
            rows.append({"category": c.category, "variant": variant, "mode": c.search_mode, "k": k, "alpha": a,
                         "map_method": map_spec, "test_images": len(c.test_labels), "metrics": metrics})
            label = f"ldknn[{variant}](k={k},alpha={a:.3g})" + (f"+map:{map_spec}" if map_setting else "")
            tracker.log_result(c.category, label, metrics, {"k": k, "alpha": a, "variant": variant,
                                                            "map_method": map_spec}, mode=c.search_mode)
    log.info(f"reported rows ({len(rows)}, on the test images): {time.perf_counter() - start:.0f} s")
    return rows, glob


def recall_metrics(c: ClassTables, cfg: RunConfig) -> dict[str, float]:
    """The recall against exact of a class's approximate searches, with their K (an approximate figure
    is labelled as one): the test patches' nearest bank point, the bank self-search at tune.k_max."""
    out = {}
    if c.query_recall is not None:
        out.update(query_recall=c.query_recall, query_recall_k=1.0)
    if c.density_recall is not None:
        out.update(density_recall=c.density_recall, density_recall_k=float(cfg.tune.k_max))
    return out


def tune_classes(cfg: RunConfig, categories: list[str], tracker: Tracker) -> tuple[list[Selection], list[dict], dict]:
    """The whole per-class search: tables, the searches per class, the global choice, test metrics.

    Returns (selections, result rows, global choice) and writes them under <output_dir>/tune/.
    """
    if cfg.scoring.k > cfg.tune.k_max:
        raise ValueError(f"scoring.k={cfg.scoring.k} (the default compared against) exceeds tune.k_max={cfg.tune.k_max}")
    placement = bank_placement(cfg)
    with ray_session():
        tables, selections = [], []
        for category in categories:
            c_start = time.perf_counter()
            c = class_tables(category, cfg.data, cfg.backbone, cfg.scoring, cfg.bank, cfg.tune, cfg.finetune.saliency,
                             cfg.cache, placement)
            with tracker.child(f"{category}/tune", {"category": category, "kind": "class"}) as run_id:
                s, pareto = search_class(c, cfg, run_id)
                record_class(tracker, c, s, pareto, cfg)
            s.seconds = time.perf_counter() - c_start
            log.info(describe(s))
            tables.append(c)
            selections.append(s)
        rows, glob = reported_rows(tables, selections, cfg, tracker)
        write_selection(Path(cfg.output_dir) / "tune", selections, rows, {c.category: c.split for c in tables}, glob)
        return selections, rows, glob


def run_tune(cfg: RunConfig, categories: list[str], command_line: str = "") -> tuple[list[Selection], list[dict], dict]:
    """`reb tune`: the per-class search in one MLflow run, its table printed and written.

    Writes <output_dir>/tune/: results.md, config.yaml, and what `tune_classes` writes.

    Returns:
        (selections, result rows, global choice), as `tune_classes`.
    """
    start = time.perf_counter()
    tracker = Tracker(cfg.tracking)
    with tracker.run(cfg, "tune"):
        selections, rows, glob = tune_classes(cfg, categories, tracker)
        table, columns = tune_table(rows)
        note = mode_footnote(table)
        print()
        print(results_table_text(table, columns) + (f"\n{note}" if note else ""))
        wall = time.perf_counter() - start
        map_text = f", map {glob['map_method']}" if "map_method" in glob else ""
        modes = ", ".join(dict.fromkeys(r["mode"] for r in rows))
        text = (results_table_markdown(table, columns) + (f"\n{note}\n" if note else "")
                + f"\n\nValidation: {cfg.tune.validation}; global choice "
                f"K={glob['k']}, alpha={glob['alpha']:.3f}{map_text}; image threshold: {cfg.tune.threshold} on "
                f"validation scores.  \nPreset: {cfg.preset} (mode: {modes})"
                f"  \nCommand: `{command_line}`  \n"
                f"Wall time: {wall:.0f} s\n")
        out = Path(cfg.output_dir) / "tune"
        write_text_atomic(out / "results.md", text)
        write_text_atomic(out / "config.yaml", cfg.to_yaml())
        tracker.log_text(text, "tune_results.md")
        for name in ("selection.json", "selection.csv", "splits.json"):
            tracker.log_artifact(out / name)
    log.info(f"wall time {wall:.0f} s; selected K and alpha in {out}/selection.csv")
    return selections, rows, glob


def tune_table(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The printed and written table of `reported_rows`' rows, and its columns: each row's search mode,
    and the recall of each approximate search where any row has one."""
    shown = ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold", "image_f1")
    recalls = [k for k in ("query_recall", "density_recall") if any(k in r["metrics"] for r in rows)]
    table = [{"category": r["category"], "variant": r["variant"], "mode": r["mode"], "k": r["k"],
              "alpha": f"{r['alpha']:.3f}", "map": r["map_method"] or "same",
              **{m: r["metrics"].get(m, float("nan")) for m in shown},
              **{k: r["metrics"][k] for k in recalls if k in r["metrics"]}} for r in rows]
    return table, ["category", "variant", "mode", "k", "alpha", "map", *shown, *recalls]
