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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reb_dist.core.anomaly_map import image_scores
from reb_dist.config import RunConfig
from reb_dist.io.data.dataset import preprocess
from reb_dist.core.detector import Detector
from reb_dist.pipelines.evaluate import load_category, loader
from reb_dist.core.ldknn.selection import NeighbourTable, ldknn_maps, neighbour_table, patch_masks, validation_objective
from reb_dist.core.metrics import evaluate
from reb_dist.reporting.plots import write_text_atomic
from reb_dist.pipelines.validation import ValidationSet, make_split


@dataclass
class ClassTables:
    """What one class contributes to a sweep: validation and test tables, and how it was split."""

    category: str
    val: NeighbourTable
    val_labels: np.ndarray
    val_masks: np.ndarray | None  # (n, h, w) patch masks
    test: NeighbourTable
    test_labels: np.ndarray
    test_masks: np.ndarray | None  # (n, S, S) pixel masks
    test_types: list[str]
    split: dict
    seconds: dict = field(default_factory=dict)


@dataclass
class Selection:
    category: str
    k: int
    alpha: float
    val_metrics: dict
    trials: int
    seconds: float


def _image_scorer(cfg: RunConfig):
    return lambda maps: image_scores(maps, cfg.scoring.image_score)


def class_tables(cfg: RunConfig, category: str) -> ClassTables:
    """Split, fit the bank, and search validation and reported test images once each."""
    t0 = time.perf_counter()
    split = load_category(cfg.data, category)
    v = make_split(split, cfg.tune.validation, cfg.tune.fraction or None, cfg.tune.seed,
                   cfg.data.image_size, cfg.finetune.saliency)
    detector = Detector.from_config(cfg.backbone, cfg.scoring, cfg.data.image_size, cfg.bank)
    try:
        batches = loader(v.train, cfg.data)
        detector.fit_features(detector.extract(batches, total=len(batches), desc=f"{category} bank"))
        index = detector.scorer.index
        if isinstance(v.validation, ValidationSet):
            images = torch.stack([preprocess(im, cfg.data.image_size) for im in v.validation.images])
            val_feats = detector.extract(images.split(cfg.data.batch_size), desc=f"{category} validation")
            val_pixel = np.stack(v.validation.masks)
            val_labels = v.validation.labels
        else:
            val_feats, val_pixel = _features_and_masks(detector, v.validation, cfg, "validation")
            val_labels = np.array([s.label for s in v.validation])
        n, h, w, _ = val_feats.shape
        val_masks = patch_masks(val_pixel, h, w) if val_pixel.any() else None
        val_table = neighbour_table(index, val_feats, cfg.tune.k_max, progress=f"{category} validation search")
        test_feats, test_masks = _features_and_masks(detector, v.test, cfg, "test")
        test_table = neighbour_table(index, test_feats, cfg.tune.k_max, progress=f"{category} test search")
    finally:
        detector.close()
    return ClassTables(category, val_table, val_labels, val_masks, test_table,
                       np.array([s.label for s in v.test]), test_masks if test_masks.any() else None,
                       [s.defect_type for s in v.test], v.record(),
                       {"tables": time.perf_counter() - t0, **detector.timings.seconds})


def _features_and_masks(detector: Detector, samples, cfg: RunConfig, what: str) -> tuple[np.ndarray, np.ndarray]:
    masks = []

    def batches():
        for b in loader(samples, cfg.data, with_masks=True):
            masks.append(b["mask"][:, 0].numpy() > 0.5)
            yield b

    feats = detector.extract(batches(), desc=what)
    return feats, np.concatenate(masks)


def _trial(config: dict, table: NeighbourTable, labels: np.ndarray, masks, image_score: str, squared: bool):
    from ray import tune

    maps = ldknn_maps(table, int(config["k"]), float(config["alpha"]), squared)
    tune.report(validation_objective(maps, labels, masks, lambda m: image_scores(m, image_score)))


def search_k_alpha(cfg: RunConfig, tables: ClassTables, mlflow_parent: str | None = None) -> Selection:
    """Ray Tune + OptunaSearch over K (integer) and alpha for one class; returns the best trial."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    import ray

    t = cfg.tune
    t0 = time.perf_counter()
    concurrency = t.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    trainable = tune.with_parameters(_trial, table=tables.val, labels=tables.val_labels, masks=tables.val_masks,
                                     image_score=cfg.scoring.image_score, squared=cfg.scoring.squared)
    callbacks = []
    if cfg.tracking.enabled and mlflow_parent:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(
            tracking_uri=cfg.tracking.uri, experiment_name=cfg.tracking.experiment, save_artifact=False,
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
            name=f"tune-{tables.category}-{cfg.backbone.name}", storage_path=str(Path(t.storage_path).absolute()),
            callbacks=callbacks, verbose=0))
    results = tuner.fit()
    best = results.get_best_result(metric="objective", mode="max")
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{tables.category}: {len(errors)} tuning trial(s) failed, first: {errors[0]!r}")
    metrics = {k: float(v) for k, v in best.metrics.items() if k.startswith(("val_", "objective"))}
    return Selection(tables.category, int(best.config["k"]), float(best.config["alpha"]), metrics,
                     len(results), time.perf_counter() - t0)


def global_choice(cfg: RunConfig, all_tables: list[ClassTables]) -> tuple[int, float, float]:
    """The single (K, alpha) with the best mean validation objective over classes, on a grid."""
    t = cfg.tune
    ks = sorted({int(round(x)) for x in np.geomspace(t.k_min, t.k_max, 12)})
    alphas = np.linspace(t.alpha_min, t.alpha_max, 9)
    score = _image_scorer(cfg)
    best = (-math.inf, ks[0], float(alphas[0]))
    for k in ks:
        for a in alphas:
            mean = float(np.mean([validation_objective(ldknn_maps(c.val, k, a, cfg.scoring.squared),
                                                       c.val_labels, c.val_masks, score)["objective"]
                                  for c in all_tables]))
            best = max(best, (mean, k, float(a)))
    return best[1], best[2], best[0]


def reported_metrics(cfg: RunConfig, c: ClassTables, k: int, alpha: float) -> dict[str, float]:
    """Metrics on the reported test images only, for one (K, alpha)."""
    from reb_dist.core.anomaly_map import pixel_maps

    maps = ldknn_maps(c.test, k, alpha, cfg.scoring.squared)
    scores = image_scores(maps, cfg.scoring.image_score)
    if c.test_masks is None or not cfg.scoring.pixel_metrics:
        return evaluate(c.test_labels, scores, c.test_types)
    pixel = pixel_maps(maps, c.test_masks.shape[-1], cfg.scoring.sigma)
    return evaluate(c.test_labels, scores, c.test_types, c.test_masks, pixel)


def write_selection(out_dir: Path, selections: list[Selection], rows: list[dict], splits: dict, glob: dict) -> None:
    """selection.json / selection.csv (the per-class K and alpha), results.json, splits.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"per_class": {s.category: {"k": s.k, "alpha": s.alpha, **s.val_metrics, "trials": s.trials}
                             for s in selections}, "global": glob}
    write_text_atomic(out_dir / "selection.json", json.dumps(payload, indent=1))
    csv = ["category,k,alpha,val_image_auroc,val_pixel_auroc,trials"] + [
        f"{s.category},{s.k},{s.alpha:.4f},{s.val_metrics.get('val_image_auroc', float('nan')):.4f},"
        f"{s.val_metrics.get('val_pixel_auroc', float('nan')):.4f},{s.trials}" for s in selections]
    write_text_atomic(out_dir / "selection.csv", "\n".join(csv) + "\n")
    write_text_atomic(out_dir / "results.json", json.dumps({"results": rows}, indent=1))
    write_text_atomic(out_dir / "splits.json", json.dumps(splits, indent=1))


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
            c = class_tables(cfg, category)
            with tracker.child(f"{category}/tune", {"category": category, "kind": "class"}) as run_id:
                s = search_k_alpha(cfg, c, run_id)
                tracker.log_params({"selected.k": s.k, "selected.alpha": s.alpha, "validation": cfg.tune.validation})
                tracker.log_metrics(s.val_metrics)
                tracker.log_text(json.dumps(c.split, indent=1), "split.json")
            print(f"{category}: K={s.k}, alpha={s.alpha:.3f} (validation image AUROC "
                  f"{s.val_metrics['val_image_auroc']:.4f}, {s.trials} trials, {s.seconds:.0f} s)")
            tables.append(c)
            selections.append(s)
        gk, ga, gobj = global_choice(cfg, tables)
        glob = {"k": gk, "alpha": ga, "mean_val_objective": gobj}
        rows = []
        for c, s in zip(tables, selections):
            variants = {"default": (cfg.scoring.k, cfg.scoring.alpha), "global": (gk, ga), "per_class": (s.k, s.alpha)}
            for variant, (k, a) in variants.items():
                metrics = reported_metrics(cfg, c, k, a)
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
