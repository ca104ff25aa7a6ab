"""Per-class K and alpha for LDKNN, chosen on a validation split with Ray Tune + Optuna.

For each class: the bank is built once from the training images left after the split, one search
gives the validation set's `NeighbourTable` (K up to tune.k_max), and the table goes into Ray's
object store once (`tune.with_parameters`); every trial only gathers and subtracts. The selected
(K, alpha) then score the reported test images, next to the best single global (K, alpha) (chosen
on the mean validation objective over classes, as the paper's Tables 2-3 compare) and the fixed
defaults. MLflow gets one nested run per class, and one run per trial under it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from reb_dist.config import RunConfig, ScoringConfig, TrackingConfig, TuneConfig
from reb_dist.core.anomaly_map import image_scores
from reb_dist.core.ldknn.selection import NeighbourTable, ldknn_maps, validation_objective
from reb_dist.io.atomic import write_text_atomic
from reb_dist.pipelines.selection import (ClassTables, Selection, class_tables, global_choice, reported_metrics,
                                          write_selection)


def _trial(config: dict, table: NeighbourTable, labels: np.ndarray, masks, image_score: str, squared: bool):
    from ray import tune

    maps = ldknn_maps(table, int(config["k"]), float(config["alpha"]), squared)
    tune.report(validation_objective(maps, labels, masks, lambda m: image_scores(m, image_score)))


def search_k_alpha(tables: ClassTables, t: TuneConfig, scoring: ScoringConfig, tracking: TrackingConfig,
                   backbone_name: str, mlflow_parent: str | None = None) -> Selection:
    """Ray Tune + OptunaSearch over K (integer) and alpha on one class's VALIDATION table.

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
    from ray.tune.search.optuna import OptunaSearch

    import ray

    t0 = time.perf_counter()
    concurrency = t.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    trainable = tune.with_parameters(_trial, table=tables.val, labels=tables.val_labels, masks=tables.val_masks,
                                     image_score=scoring.image_score, squared=scoring.squared)
    callbacks = []
    if tracking.enabled and mlflow_parent:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(
            tracking_uri=tracking.uri, experiment_name=tracking.experiment, save_artifact=False,
            tags={"mlflow.parentRunId": mlflow_parent, "category": tables.category, "kind": "trial"}))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.5}),
        param_space={"k": tune.randint(t.k_min, t.k_max + 1), "alpha": tune.uniform(t.alpha_min, t.alpha_max)},
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric="objective", mode="max", seed=t.seed),
            num_samples=t.trials, max_concurrent_trials=concurrency,
            reuse_actors=True,  # a trial is milliseconds of numpy; a new worker per trial was ~10 s of imports
            trial_name_creator=lambda trial: f"{tables.category}-{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=f"tune-{tables.category}-{backbone_name}", storage_path=str(Path(t.storage_path).absolute()),
            callbacks=callbacks, verbose=0))
    results = tuner.fit()
    best = results.get_best_result(metric="objective", mode="max")
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{tables.category}: {len(errors)} tuning trial(s) failed, first: {errors[0]!r}")
    metrics = {k: float(v) for k, v in best.metrics.items() if k.startswith(("val_", "objective"))}
    return Selection(tables.category, int(best.config["k"]), float(best.config["alpha"]), metrics,
                     len(results), time.perf_counter() - t0)


def tune_classes(cfg: RunConfig, categories: list[str], tracker) -> tuple[list[Selection], list[dict], dict]:
    """The whole per-class search: tables, a Tune search per class, the global choice, test metrics.

    Returns (selections, result rows, global choice) and writes them under <output_dir>/tune/.
    """
    from reb_dist.distributed.runtime import ensure_ray

    if cfg.scoring.k > cfg.tune.k_max:
        raise ValueError(f"scoring.k={cfg.scoring.k} (the default compared against) exceeds tune.k_max={cfg.tune.k_max}")
    started = ensure_ray()
    try:
        tables, selections = [], []
        for category in categories:
            c = class_tables(category, cfg.data, cfg.backbone, cfg.scoring, cfg.bank, cfg.tune, cfg.finetune.saliency,
                             cfg.cache)
            with tracker.child(f"{category}/tune", {"category": category, "kind": "class"}) as run_id:
                s = search_k_alpha(c, cfg.tune, cfg.scoring, cfg.tracking, cfg.backbone.name, run_id)
                tracker.log_params({"selected.k": s.k, "selected.alpha": s.alpha, "validation": cfg.tune.validation})
                tracker.log_metrics(s.val_metrics)
                tracker.log_text(json.dumps(c.split, indent=1), "split.json")
            print(f"{category}: K={s.k}, alpha={s.alpha:.3f} (validation image AUROC "
                  f"{s.val_metrics['val_image_auroc']:.4f}, {s.trials} trials, {s.seconds:.0f} s)")
            tables.append(c)
            selections.append(s)
        gk, ga, gobj = global_choice(tables, cfg.tune, cfg.scoring)
        glob = {"k": gk, "alpha": ga, "mean_val_objective": gobj}
        rows = []
        for c, s in zip(tables, selections):
            variants = {"default": (cfg.scoring.k, cfg.scoring.alpha), "global": (gk, ga), "per_class": (s.k, s.alpha)}
            for variant, (k, a) in variants.items():
                metrics = reported_metrics(c, k, a, cfg.scoring)
                if c.query_recall is not None:  # an approximate figure is labelled as one
                    metrics.update(query_recall=c.query_recall, query_recall_k=1.0)
                rows.append({"category": c.category, "variant": variant, "k": k, "alpha": a,
                             "test_images": len(c.test_labels), "metrics": metrics})
                tracker.log_result(c.category, f"ldknn[{variant}](k={k},alpha={a:.3g})", metrics,
                                   {"k": k, "alpha": a, "variant": variant})
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
        table = [{"category": r["category"], "variant": r["variant"], "k": r["k"], "alpha": f"{r['alpha']:.3f}",
                  **{m: r["metrics"].get(m, float("nan")) for m in ("image_auroc", "pixel_auroc", "aupro")}}
                 for r in rows]
        columns = ["category", "variant", "k", "alpha", "image_auroc", "pixel_auroc", "aupro"]
        print()
        print(results_table_text(table, columns))
        wall = time.perf_counter() - start
        text = (results_table_markdown(table, columns) + f"\n\nValidation: {cfg.tune.validation}; global choice "
                f"K={glob['k']}, alpha={glob['alpha']:.3f}.  \nPreset: {cfg.preset}  \nCommand: `{command_line}`  \n"
                f"Wall time: {wall:.0f} s\n")
        out = Path(cfg.output_dir) / "tune"
        write_text_atomic(out / "results.md", text)
        cfg.dump(out / "config.yaml")
        tracker.log_text(text, "tune_results.md")
        for name in ("selection.json", "selection.csv", "splits.json"):
            tracker.log_artifact(out / name)
    print(f"\nwall time {wall:.0f} s; selected K and alpha in {out}/selection.csv")
    return selections, rows, glob
