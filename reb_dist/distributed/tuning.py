"""Per-class settings of LDKNN's image score and anomaly map, chosen on a validation split with Ray
Tune + Optuna.

For each class: the bank is built once from the training images left after the split, one search
gives the validation set's `NeighbourTable` (K up to tune.k_max), and the table goes into Ray's
object store once (`tune.with_parameters`); every trial only gathers and subtracts. Two searches
per class, each on its own validation objective: the image score's (K, alpha) on image AUROC (pixel
AUROC only breaks ties), then the map's (method, K, alpha) on pixel AUROC and AUPRO. The choices
then score the reported test images, next to the best single global settings (chosen on the mean
validation objectives over classes, as the paper's Tables 2-3 compare) and the fixed defaults, with
an image threshold taken from the validation scores. With tune.multi_objective, a third search per
class takes one coupled (K, alpha) for image score and map alike, as the paper, on both objectives
at once (Optuna multi-objective); its Pareto front gives the choice (`pareto_choice`). MLflow gets
one nested run per class, and one run per trial under it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from reb_dist.config import RunConfig, ScoringConfig, TrackingConfig, TuneConfig
from reb_dist.core.anomaly_map import image_scores, pixel_maps
from reb_dist.core.ldknn import ScoringMethod
from reb_dist.core.ldknn.selection import NeighbourTable, ldknn_maps, map_objective, method_maps, validation_objective
from reb_dist.io.atomic import write_text_atomic
from reb_dist.pipelines.selection import (ClassTables, Selection, class_tables, coupled_validation,
                                          global_choice, global_map_choice, pareto_choice, pareto_front,
                                          reported_metrics, validation_calibration, write_selection)

log = logging.getLogger(__name__)
PARETO_METRICS = ("val_image_auroc", "map_objective")  # the coupled search's two objectives, both maximised


def _trial(config: dict, table: NeighbourTable, labels: np.ndarray, masks, image_score: str, squared: bool):
    from ray import tune

    maps = ldknn_maps(table, int(config["k"]), float(config["alpha"]), squared)
    tune.report(validation_objective(maps, labels, masks, lambda m: image_scores(m, image_score)))


def _map_trial(config: dict, table: NeighbourTable, pixel_masks: np.ndarray, keep: np.ndarray, sigma: float,
               squared: bool):
    from ray import tune

    patch = method_maps(table, config["method"], int(config["k"]), float(config["alpha"]), squared)
    tune.report(map_objective(pixel_maps(patch, pixel_masks.shape[-1], sigma), pixel_masks, keep))


def _pareto_trial(config: dict, table: NeighbourTable, labels: np.ndarray, masks, pixel_masks: np.ndarray,
                  keep: np.ndarray, image_score: str, sigma: float, squared: bool):
    from ray import tune

    maps = ldknn_maps(table, int(config["k"]), float(config["alpha"]), squared)
    image = validation_objective(maps, labels, masks, lambda m: image_scores(m, image_score))
    tune.report({**image, **map_objective(pixel_maps(maps, pixel_masks.shape[-1], sigma), pixel_masks, keep)})


def _search(trainable, param_space: dict, metric: str | list[str], trials: int, t: TuneConfig, name: str,
            category: str, tracking: TrackingConfig, mlflow_parent: str | None):
    """Run one Optuna search with Ray Tune and return its results (every trial must succeed); a list
    of metrics is a multi-objective search, every one maximised."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    import ray

    concurrency = t.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    callbacks = []
    if tracking.enabled and mlflow_parent:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        from reb_dist.io.tracking import resolve_uri

        callbacks.append(MLflowLoggerCallback(
            tracking_uri=resolve_uri(tracking.uri), experiment_name=tracking.experiment, save_artifact=False,
            tags={"mlflow.parentRunId": mlflow_parent, "category": category, "kind": "trial"}))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.5}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric=metric, mode=["max"] * len(metric) if isinstance(metric, list)
                                    else "max", seed=t.seed),
            num_samples=trials, max_concurrent_trials=concurrency,
            reuse_actors=True,  # a trial is milliseconds of numpy; a new worker per trial was ~10 s of imports
            trial_name_creator=lambda trial: f"{category}-{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=name, storage_path=str(Path(t.storage_path).absolute()), callbacks=callbacks, verbose=0))
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{category}: {len(errors)} tuning trial(s) failed, first: {errors[0]!r}")
    return results


def search_k_alpha(tables: ClassTables, t: TuneConfig, scoring: ScoringConfig, tracking: TrackingConfig,
                   backbone_name: str, mlflow_parent: str | None = None) -> Selection:
    """Ray Tune + OptunaSearch over the image score's K (integer) and alpha on one class's VALIDATION table.

    The objective is validation image AUROC; validation pixel AUROC only orders ties (see
    `validation_objective`).

    Args:
        tables: the class's tables (only `val`, its labels and masks are read).
        t: the search space, trial count, concurrency, seed and Tune storage.
        scoring: image score reduction and distance (squared or not).
        tracking: where trial runs are logged (nested under `mlflow_parent`, if given).
        backbone_name: names the Tune experiment, "tune-<category>-<backbone_name>".

    Returns:
        The best trial's (K, alpha) and validation metrics.
    """
    from ray import tune

    t0 = time.perf_counter()
    trainable = tune.with_parameters(_trial, table=tables.val, labels=tables.val_labels, masks=tables.val_masks,
                                     image_score=scoring.image_score, squared=scoring.squared)
    space = {"k": tune.randint(t.k_min, t.k_max + 1), "alpha": tune.uniform(t.alpha_min, t.alpha_max)}
    results = _search(trainable, space, "objective", t.trials, t, f"tune-{tables.category}-{backbone_name}",
                      tables.category, tracking, mlflow_parent)
    best = results.get_best_result(metric="objective", mode="max")
    metrics = {k: float(v) for k, v in best.metrics.items() if k.startswith(("val_", "objective"))}
    return Selection(tables.category, int(best.config["k"]), float(best.config["alpha"]), metrics,
                     len(results), time.perf_counter() - t0)


def search_map(tables: ClassTables, t: TuneConfig, scoring: ScoringConfig, tracking: TrackingConfig,
               backbone_name: str, mlflow_parent: str | None = None) -> tuple[ScoringMethod, dict, int]:
    """Ray Tune + OptunaSearch over the anomaly map's method (ldknn | knn), K and alpha on one class's
    VALIDATION images and masks; objective: the mean of validation pixel AUROC and AUPRO.

    Returns:
        (the best setting, its validation metrics, the number of trials).
    """
    from ray import tune

    trainable = tune.with_parameters(_map_trial, table=tables.val, pixel_masks=tables.val_pixel_masks,
                                     keep=tables.val_has_mask, sigma=tables.sigma, squared=scoring.squared)
    space = {"method": tune.choice(["ldknn", "knn"]), "k": tune.randint(t.k_min, t.k_max + 1),
             "alpha": tune.uniform(0.0, t.map_alpha_max)}
    results = _search(trainable, space, "map_objective", t.map_trials, t,
                      f"tune-map-{tables.category}-{backbone_name}", tables.category, tracking, mlflow_parent)
    best = results.get_best_result(metric="map_objective", mode="max")
    c = best.config
    setting = ScoringMethod(c["method"], int(c["k"]), float(c["alpha"]) if c["method"] == "ldknn" else 0.0)
    metrics = {k: float(v) for k, v in best.metrics.items() if k.startswith(("val_map", "map_objective"))}
    return setting, metrics, len(results)


def search_pareto(tables: ClassTables, t: TuneConfig, scoring: ScoringConfig, tracking: TrackingConfig,
                  backbone_name: str,
                  mlflow_parent: str | None = None) -> tuple[list[dict], list[dict], dict | None, dict]:
    """Ray Tune + OptunaSearch (multi-objective) over one COUPLED LDKNN (K, alpha), the image score's
    and the map's, on one class's VALIDATION images and masks: validation image AUROC and the map
    objective (mean of pixel AUROC and AUPRO), both maximised; tune.trials trials, K in
    k_min..k_max, alpha in alpha_min..alpha_max.

    Returns:
        (every trial's K, alpha and validation metrics, their `pareto_front`, its `pareto_choice`
        against the reference, the reference: the default scoring.k / scoring.alpha on the same images).
    """
    from ray import tune

    trainable = tune.with_parameters(_pareto_trial, table=tables.val, labels=tables.val_labels,
                                     masks=tables.val_masks, pixel_masks=tables.val_pixel_masks,
                                     keep=tables.val_has_mask, image_score=scoring.image_score, sigma=tables.sigma,
                                     squared=scoring.squared)
    space = {"k": tune.randint(t.k_min, t.k_max + 1), "alpha": tune.uniform(t.alpha_min, t.alpha_max)}
    results = _search(trainable, space, list(PARETO_METRICS), t.trials, t,
                      f"tune-pareto-{tables.category}-{backbone_name}", tables.category, tracking, mlflow_parent)
    # get_best_result takes one metric: every trial's pair is read from the grid instead
    kept = ("val_", "objective", "map_objective")
    trials = [{"k": int(r.config["k"]), "alpha": float(r.config["alpha"]),
               **{k: float(v) for k, v in r.metrics.items() if k.startswith(kept)}} for r in results]
    front = pareto_front(trials)
    reference = coupled_validation(tables, scoring.k, scoring.alpha, scoring)
    return trials, front, pareto_choice(front, reference), reference


def tune_classes(cfg: RunConfig, categories: list[str], tracker) -> tuple[list[Selection], list[dict], dict]:
    """The whole per-class search: tables, a Tune search per class, the global choice, test metrics.

    Returns (selections, result rows, global choice) and writes them under <output_dir>/tune/.
    """
    from reb_dist.distributed.runtime import ensure_ray
    from reb_dist.reporting.plots import pareto_plot, save_figure

    if cfg.scoring.k > cfg.tune.k_max:
        raise ValueError(f"scoring.k={cfg.scoring.k} (the default compared against) exceeds tune.k_max={cfg.tune.k_max}")
    started = ensure_ray()
    try:
        tables, selections = [], []
        for category in categories:
            c_start = time.perf_counter()
            c = class_tables(category, cfg.data, cfg.backbone, cfg.scoring, cfg.bank, cfg.tune, cfg.finetune.saliency,
                             cfg.cache)
            with tracker.child(f"{category}/tune", {"category": category, "kind": "class"}) as run_id:
                s = search_k_alpha(c, cfg.tune, cfg.scoring, cfg.tracking, cfg.backbone.name, run_id)
                s.calibration = validation_calibration(c, s.k, s.alpha, cfg.tune, cfg.scoring).to_dict()
                params = {"selected.k": s.k, "selected.alpha": s.alpha, "validation": cfg.tune.validation,
                          "selected.threshold": s.calibration["threshold"]}
                if cfg.tune.map_trials and c.val_pixel_masks is not None:
                    s.map, s.map_val_metrics, s.map_trials = search_map(c, cfg.tune, cfg.scoring, cfg.tracking,
                                                                        cfg.backbone.name, run_id)
                    params["selected.map_method"] = s.map.spec
                if cfg.tune.multi_objective and c.val_pixel_masks is not None:
                    trials, s.pareto, s.pareto_choice, reference = search_pareto(
                        c, cfg.tune, cfg.scoring, cfg.tracking, cfg.backbone.name, run_id)
                    if s.pareto_choice is not None:
                        params.update({"selected.pareto_k": s.pareto_choice["k"],
                                       "selected.pareto_alpha": s.pareto_choice["alpha"]})
                    plot = save_figure(pareto_plot(trials, s.pareto, s.pareto_choice, reference, category),
                                       Path(cfg.output_dir) / "tune" / f"pareto_{category}.png", 120)
                    tracker.log_artifact(plot)
                    # what `reb report` redraws the plot from
                    tracker.log_text(json.dumps({"trials": trials, "front": s.pareto, "choice": s.pareto_choice,
                                                 "reference": reference}, indent=1), f"pareto_{category}.json")
                tracker.log_params(params)
                tracker.log_metrics({**s.val_metrics, **s.map_val_metrics})
                tracker.log_text(json.dumps(c.split, indent=1), "split.json")
            s.held_out_train = list(c.split.get("held_out_train", []))
            s.seconds = time.perf_counter() - c_start
            log.info(f"{category}: image K={s.k}, alpha={s.alpha:.3f} (validation image AUROC "
                     f"{s.val_metrics['val_image_auroc']:.4f}, {s.trials} trials); map "
                     + (f"{s.map.spec} (validation pixel AUROC {s.map_val_metrics['val_map_pixel_auroc']:.4f}, "
                        f"AUPRO {s.map_val_metrics['val_map_aupro']:.4f}, {s.map_trials} trials)" if s.map else
                        "coupled")
                     + (f"; Pareto K={s.pareto_choice['k']}, alpha={s.pareto_choice['alpha']:.3f} (front of "
                        f"{len(s.pareto)})" if s.pareto_choice else "") + f"; {s.seconds:.0f} s")
            tables.append(c)
            selections.append(s)
        gk, ga, gobj = global_choice(tables, cfg.tune, cfg.scoring)
        glob = {"k": gk, "alpha": ga, "mean_val_objective": gobj}
        gmap = None
        if any(s.map is not None for s in selections):
            gmap, gmap_obj = global_map_choice(tables, cfg.tune, cfg.scoring)
            glob.update(map_method=gmap.spec, mean_val_map_objective=gmap_obj)
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
                metrics = reported_metrics(c, k, a, cfg.scoring, map_setting, calibration)
                if c.query_recall is not None:  # an approximate figure is labelled as one
                    metrics.update(query_recall=c.query_recall, query_recall_k=1.0)
                rows.append({"category": c.category, "variant": variant, "k": k, "alpha": a,
                             "map_method": map_setting.spec if map_setting else "",
                             "test_images": len(c.test_labels), "metrics": metrics})
                label = f"ldknn[{variant}](k={k},alpha={a:.3g})" + (f"+map:{map_setting.spec}" if map_setting else "")
                tracker.log_result(c.category, label, metrics, {"k": k, "alpha": a, "variant": variant,
                                                                "map_method": map_setting.spec if map_setting else ""})
        write_selection(Path(cfg.output_dir) / "tune", selections, rows, {c.category: c.split for c in tables}, glob)
        return selections, rows, glob
    finally:
        if started:
            import ray

            ray.shutdown()


def run_tune(cfg: RunConfig, categories: list[str], command_line: str = "") -> tuple[list[Selection], list[dict], dict]:
    """`reb tune`: the per-class search in one MLflow run, its table printed and written.

    Writes <output_dir>/tune/: results.md, config.yaml, and what `tune_classes` writes.

    Returns:
        (selections, result rows, global choice), as `tune_classes`.
    """
    from reb_dist.io.tracking import Tracker
    from reb_dist.reporting.tables import results_table_markdown, results_table_text

    start = time.perf_counter()
    tracker = Tracker(cfg.tracking)
    with tracker.run(cfg, "tune"):
        selections, rows, glob = tune_classes(cfg, categories, tracker)
        shown = ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold", "image_f1")
        table = [{"category": r["category"], "variant": r["variant"], "k": r["k"], "alpha": f"{r['alpha']:.3f}",
                  "map": r["map_method"] or "same", **{m: r["metrics"].get(m, float("nan")) for m in shown}}
                 for r in rows]
        columns = ["category", "variant", "k", "alpha", "map", *shown]
        print()
        print(results_table_text(table, columns))
        wall = time.perf_counter() - start
        map_text = f", map {glob['map_method']}" if "map_method" in glob else ""
        text = (results_table_markdown(table, columns) + f"\n\nValidation: {cfg.tune.validation}; global choice "
                f"K={glob['k']}, alpha={glob['alpha']:.3f}{map_text}; image threshold: {cfg.tune.threshold} on "
                f"validation scores.  \nPreset: {cfg.preset}  \nCommand: `{command_line}`  \n"
                f"Wall time: {wall:.0f} s\n")
        out = Path(cfg.output_dir) / "tune"
        write_text_atomic(out / "results.md", text)
        write_text_atomic(out / "config.yaml", cfg.to_yaml())
        tracker.log_text(text, "tune_results.md")
        for name in ("selection.json", "selection.csv", "splits.json"):
            tracker.log_artifact(out / name)
    log.info(f"wall time {wall:.0f} s; selected K and alpha in {out}/selection.csv")
    return selections, rows, glob
