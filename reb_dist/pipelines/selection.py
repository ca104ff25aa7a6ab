"""Choosing the image score's and the anomaly map's settings on a validation split: the pure part
of `reb tune` (no Ray).

A class's bank is fitted once and its validation and reported test images searched once each; the
resulting `NeighbourTable`s give LDKNN (and KNN) maps for any (K, alpha) by a gather and a
subtraction. The image score's (K, alpha) and the map's (method, K, alpha) are chosen separately,
each by its own validation objective: image AUROC for the first, pixel AUROC and AUPRO for the
second. Optionally (tune.multi_objective) one coupled (K, alpha), as the paper, is chosen from the
Pareto front of both objectives (`pareto_front`, `pareto_choice`). Ray Tune
(reb_dist.distributed.tuning) searches per class over the tables; the global choices, the image
thresholds and the test metrics are computed here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from reb_dist.config import BackboneConfig, BankConfig, CacheConfig, DataConfig, ScoringConfig, TuneConfig
from reb_dist.core.anomaly_map import image_scores, pixel_maps
from reb_dist.detectors import build_detector
from reb_dist.core.ldknn.approx import query_recall as measure_query_recall
from reb_dist.core.ldknn.formulas import local_density, to_distance
from reb_dist.core.ldknn.selection import (NeighbourTable, ldknn_maps, map_objective, method_maps, neighbour_table,
                                           patch_masks, validation_objective)
from reb_dist.core.ldknn import ScoringMethod
from reb_dist.core.ldknn.refine import corner_settings, refine_table
from reb_dist.core.metrics import evaluate
from reb_dist.core.threads import resolve_threads
from reb_dist.core.thresholds import Calibration, calibrate, threshold_metrics
from reb_dist.io.atomic import write_text_atomic
from reb_dist.io.data import preprocess
from reb_dist.io.feature_cache import FeatureCache, graph_folder
from reb_dist.pipelines.bank import BankPlacement, placed_index_factory
from reb_dist.pipelines.evaluate import extract_samples, extract_with_masks, load_category, pixel_countable
from reb_dist.pipelines.validation import ValidationSet, make_split
from reb_dist.reporting.tables import to_csv


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
    query_recall: float | None = None  # recall@1 of the approximate test-patch search run (None: exact)
    val_pixel_masks: np.ndarray | None = None  # (n, S, S) 0/1 masks of the validation images
    val_has_mask: np.ndarray | None = None  # (n,) bool: normal, or anomalous with a mask
    test_has_mask: np.ndarray | None = None  # (n,) bool, as evaluate counts pixel metrics (None: all)
    sigma: float = 4.0  # the map blur the pixel metrics are taken after
    search_mode: str = "exact"  # what the bank's searches computed (Detector.search_mode)
    density_recall: float | None = None  # recall@k_max of an approximate density search (None: exact)
    # K -> (n, h, w, K) squared distances of the test patches to their K nearest bank points: the
    # KNN maps' search, run only for the K a reported KNN map asks for (`test_table`); None when
    # the test table was searched at tune.k_max up front (a bank on Ray actors, which stop after the tables)
    test_search: Callable[[int], np.ndarray] | None = field(default=None, repr=False)
    # (test table, K, alpha) -> the table with the hottest patches of LDKNN (K, alpha) searched exactly
    # (`reb_dist.core.ldknn.refine`), as evaluate's faithful mode scores them; None: exact searches,
    # bank.refine_top=0, or a bank on Ray actors (stopped after the tables: the test table was
    # refined at the search box's corners instead)
    test_refine: Callable[[NeighbourTable, int, float], NeighbourTable] | None = field(default=None, repr=False)

    def validation_masks(self) -> np.ndarray:
        """(n, S, S) 0/1 masks of the validation images, what a map setting is chosen on; ValueError
        when the validation images have none."""
        if self.val_pixel_masks is None:
            raise ValueError(f"{self.category}: the validation images have no masks to choose a map setting on")
        return self.val_pixel_masks

    def test_table(self, k: int = 1) -> NeighbourTable:
        """The test table, with each patch's `k` nearest bank points kept (searched now when deferred)."""
        kept = 1 if self.test.query_dist2 is None else self.test.query_dist2.shape[-1]
        if k > kept and self.test_search is not None:
            self.test = replace(self.test, query_dist2=self.test_search(k))
        return self.test

    def test_ldknn_maps(self, k: int, alpha: float, squared: bool = True) -> np.ndarray:
        """(n, h, w) LDKNN maps of the test images, their hottest patches exact where a search was approximate."""
        if self.test_refine is not None:
            self.test = self.test_refine(self.test, k, alpha)
        return ldknn_maps(self.test, k, alpha, squared)


@dataclass
class Selection:
    """One class's chosen image (K, alpha) and map setting, their validation metrics, and the searches."""

    category: str
    k: int
    alpha: float
    val_metrics: dict
    trials: int
    seconds: float
    map: ScoringMethod | None = None  # the map's own method (ldknn or knn); None: the image score's own (coupled)
    map_val_metrics: dict = field(default_factory=dict)
    map_trials: int = 0
    calibration: dict = field(default_factory=dict)  # the image threshold and normalisation (Calibration.to_dict)
    held_out_train: list[str] = field(default_factory=list)  # training images left out of the bank
    pareto: list[dict] = field(default_factory=list)  # the coupled search's Pareto front (`pareto_front`)
    pareto_choice: dict | None = None  # the front point `pareto_choice` picks (None: no coupled search)


def class_tables(category: str, data: DataConfig, backbone: BackboneConfig, scoring: ScoringConfig,
                 bank: BankConfig, tune: TuneConfig, saliency: str = "spectral",
                 cache: CacheConfig | None = None, placement: BankPlacement | None = None) -> ClassTables:
    """Split a class, fit its bank on what is left for training, and search the validation and the
    reported test images once each (K up to tune.k_max).

    Args:
        category: the class.
        data, backbone, scoring, bank: how to read images, extract features and hold the bank.
        tune: the validation split (kind, fraction, seed) and k_max.
        saliency: DefectMaker's saliency for synthetic validation anomalies.
        cache: the feature cache for the class's image files (None: no cache); synthetic validation
            images are always extracted.
        placement: where the bank is indexed (on Ray actors when the commands give one).

    Returns:
        The class's neighbour tables, labels, masks and split record.
    """
    t0 = time.perf_counter()
    split = load_category(data, category)
    v = make_split(split, tune.validation, tune.fraction or None, tune.seed, data.image_size, saliency)
    detector = build_detector(backbone, scoring, data.image_size, bank, placed_index_factory(bank, category, placement),
                              graph_folder(cache) if cache is not None else None)
    try:
        features_cache = FeatureCache.from_config(cache) if cache is not None else None
        train_feats, _ = extract_samples(detector, v.train, data, f"{category} bank", features_cache)
        detector.fit_features(train_feats)
        del train_feats
        if isinstance(v.validation, ValidationSet):
            images = torch.stack([preprocess(im, data.image_size) for im in v.validation.images])
            val_feats = detector.extract(images.split(data.batch_size), desc=f"{category} validation")
            val_pixel = np.stack(v.validation.masks)
            val_labels = v.validation.labels
        else:
            val_feats, val_pixel = extract_with_masks(detector, v.validation, data, "validation", features_cache)
            val_labels = np.array([s.label for s in v.validation])
        if isinstance(v.validation, ValidationSet):
            val_has_mask = np.ones(len(val_labels), bool)
        else:
            val_has_mask = pixel_countable(v.validation)
        n, h, w, _ = val_feats.shape
        val_masks = patch_masks(val_pixel, h, w) & val_has_mask[:, None, None] if val_pixel.any() else None
        query_k = tune.k_max if tune.map_trials else 1  # KNN maps need each patch's K nearest
        stats = detector.scorer.stats  # one cache of bank points' neighbours for both tables
        val_table = neighbour_table(detector.index, val_feats, tune.k_max, f"{category} validation search", query_k,
                                    stats)
        refine = detector.refines_image_scores  # approximate searches: the hottest patches exactly
        corners = corner_settings(tune.k_min, tune.k_max, tune.alpha_min, tune.alpha_max)
        if refine:  # for every trial at once: the hottest patches of the search box's corners
            start = time.perf_counter()
            val_table, _ = refine_table(detector.index, val_feats, val_table, corners, bank.refine_top, scoring.squared)
            detector.timings.add("refine", start)
        test_feats, test_masks = extract_with_masks(detector, v.test, data, "test", features_cache)
        # An in-process index outlives the tables: the test patches' K nearest (for KNN maps) are
        # searched later, only for the K a chosen map asks for, not at tune.k_max for every patch
        # (magnetic_tile: 596k patches, K = 64). Actors of a sharded bank stop with the tables.
        deferred = placement is None and query_k > 1
        test_k = 1 if deferred else query_k
        test_table = neighbour_table(detector.index, test_feats, tune.k_max, f"{category} test search", test_k, stats)
        test_search = deferred_search(detector.index, test_feats, f"{category} test search") if deferred else None
        # the reported rows: each setting's own hottest patches, exactly (as evaluate scores them) while
        # the in-process index lives; a sharded bank's actors stop with the tables: the corners' now
        in_process = placement is None
        test_refine = (deferred_refine(detector.index, test_feats, bank.refine_top, scoring.squared)
                       if refine and in_process else None)
        if refine and not in_process:
            test_table, _ = refine_table(detector.index, test_feats, test_table, corners, bank.refine_top,
                                         scoring.squared)
        recall = None
        if detector.index.query_search != "exact":
            recall = measure_query_recall(detector.index, test_feats.reshape(-1, test_feats.shape[-1]), 1,
                                          bank.recall_sample, bank.seed, search_k=test_k)
        detector.measure_density_recall(tune.k_max)
        mode, density_recall = detector.search_mode, detector.density_recall.get(tune.k_max)
    finally:
        detector.close()
    # as evaluate does: pixel metrics count normal images and anomalous ones that have a mask
    test_has_mask = pixel_countable(v.test)
    return ClassTables(category, val_table, val_labels, val_masks, test_table,
                       np.array([s.label for s in v.test]), test_masks if test_masks.any() else None,
                       [s.defect_type for s in v.test], v.record(),
                       {"tables": time.perf_counter() - t0, **detector.timings.seconds}, recall,
                       val_pixel if val_pixel.any() else None, val_has_mask, test_has_mask, scoring.sigma,
                       mode, density_recall, test_search, test_refine)


def deferred_search(index, features: np.ndarray, progress: str) -> Callable[[int], np.ndarray]:
    """K -> (n, h, w, K) squared distances of (n, h, w, d) `features` to their K nearest bank points."""
    n, h, w, d = features.shape

    def search(k: int) -> np.ndarray:
        dist2, _ = index.search(features.reshape(-1, d), k, progress=progress)
        return dist2.reshape(n, h, w, k).astype(np.float32)

    return search


def deferred_refine(index, features: np.ndarray, top: int,
                    squared: bool = True) -> Callable[[NeighbourTable, int, float], NeighbourTable]:
    """(table of `features`, K, alpha) -> the table with each image's `top` hottest patches under LDKNN
    (K, alpha) searched exactly; patches an earlier call refined are not searched again (the
    reported rows' settings share most of their hottest patches)."""
    refined = np.zeros(features.shape[0] * features.shape[1] * features.shape[2], bool)

    def refine(table: NeighbourTable, k: int, alpha: float) -> NeighbourTable:
        return refine_table(index, features, table, [(k, alpha)], top, squared, refined)[0]

    return refine


def global_choice(all_tables: list[ClassTables], tune: TuneConfig, scoring: ScoringConfig) -> tuple[int, float, float]:
    """The single (K, alpha) with the best mean VALIDATION objective over classes, on a grid
    (12 K geometrically spaced in tune.k_min..k_max, 9 alphas evenly in alpha_min..alpha_max).

    Returns:
        (K, alpha, mean validation objective).
    """
    ks = sorted({int(round(x)) for x in np.geomspace(tune.k_min, tune.k_max, 12)})
    alphas = np.linspace(tune.alpha_min, tune.alpha_max, 9)
    score = lambda maps: image_scores(maps, scoring.image_score)
    best = (-math.inf, ks[0], float(alphas[0]))
    for k in ks:
        for a in alphas:
            mean = float(np.mean([validation_objective(ldknn_maps(c.val, k, a, scoring.squared),
                                                       c.val_labels, c.val_masks, score)["objective"]
                                  for c in all_tables]))
            best = max(best, (mean, k, float(a)))
    return best[1], best[2], best[0]


def map_grid(tune: TuneConfig) -> list[ScoringMethod]:
    """The global map search's grid: LDKNN at 6 K (geometric in k_min..k_max) x 5 alphas (0..map_alpha_max),
    and KNN at the same K."""
    ks = sorted({int(round(x)) for x in np.geomspace(tune.k_min, tune.k_max, 6)})
    alphas = np.linspace(0.0, tune.map_alpha_max, 5)
    return [ScoringMethod("ldknn", k, float(a)) for k in ks for a in alphas] + [ScoringMethod("knn", k, 0.0) for k in ks]


def validation_map_objective(c: ClassTables, setting: ScoringMethod, scoring: ScoringConfig) -> dict[str, float]:
    """The map objective (mean of pixel AUROC and AUPRO) of a setting on the class's VALIDATION images."""
    masks = c.validation_masks()
    patch = method_maps(c.val, setting.name, setting.k, setting.alpha, scoring.squared)
    return map_objective(pixel_maps(patch, masks.shape[-1], c.sigma), masks, c.val_has_mask)


def grid_map_objectives(c: ClassTables, settings: list[ScoringMethod], scoring: ScoringConfig) -> list[float]:
    """`validation_map_objective`'s map objective of each setting on the class's VALIDATION images,
    computed together.

    Upsampling and blurring are linear, so an LDKNN pixel map is pixel(dist) - alpha * pixel(density
    of K): one pixel map of the distances and one per K serve every alpha (13 blurs instead of 36 on
    `map_grid`; values equal to blurring each map within float32 rounding). The settings' metrics
    run side by side on the CPUs this process may use.
    """
    masks = c.validation_masks()
    size = masks.shape[-1]
    pixel = lambda patch: pixel_maps(patch, size, c.sigma)
    distance = pixel(to_distance(c.val.nn_dist2, scoring.squared))
    density = {k: pixel(local_density(c.val.bank_dist2, k, scoring.squared)[c.val.nn_row])
               for k in sorted({s.k for s in settings if s.name == "ldknn"})}

    def objective(setting: ScoringMethod) -> float:
        if setting.name == "ldknn":
            maps = distance - np.float32(setting.alpha) * density[setting.k]
        else:
            maps = pixel(method_maps(c.val, setting.name, setting.k, setting.alpha, scoring.squared))
        return map_objective(maps, masks, c.val_has_mask)["map_objective"]

    with ThreadPoolExecutor(resolve_threads()) as pool:
        return list(pool.map(objective, settings))


def global_map_choice(all_tables: list[ClassTables], tune: TuneConfig,
                      scoring: ScoringConfig) -> tuple[ScoringMethod, float]:
    """The single map setting with the best mean VALIDATION map objective over the classes that have
    validation masks, on `map_grid` (the first of equals, in the grid's order).

    Returns:
        (setting, mean validation map objective).
    """
    with_masks = [c for c in all_tables if c.val_pixel_masks is not None]
    if not with_masks:
        raise ValueError("no class has validation masks to choose a map setting on")
    grid = map_grid(tune)
    means = np.mean([grid_map_objectives(c, grid, scoring) for c in with_masks], axis=0)
    if np.isnan(means).all():
        raise ValueError("no map setting has a validation map objective (no anomalous validation pixel)")
    best = int(np.argmax(np.where(np.isnan(means), -np.inf, means)))  # the first of equals
    return grid[best], float(means[best])


def coupled_validation(c: ClassTables, k: int, alpha: float, scoring: ScoringConfig) -> dict[str, float]:
    """Both validation objectives of one coupled LDKNN (K, alpha), image score and map alike:
    `validation_objective`'s image AUROC and `validation_map_objective`'s map objective."""
    image = validation_objective(ldknn_maps(c.val, k, alpha, scoring.squared), c.val_labels, c.val_masks,
                                 lambda maps: image_scores(maps, scoring.image_score))
    return {"k": k, "alpha": alpha, **image, **validation_map_objective(c, ScoringMethod("ldknn", k, alpha), scoring)}


def pareto_front(points: list[dict]) -> list[dict]:
    """The non-dominated points of a two-objective search, both objectives maximised.

    A point dominates another when it is at least as good on `val_image_auroc` and on
    `map_objective` and better on one. Points with a non-finite objective are left out, and of points
    with equal values only the first stands on the front.

    Args:
        points: dicts with ``val_image_auroc`` and ``map_objective`` (e.g. the trials, with K and alpha).

    Returns:
        The front's points (the given dicts), by increasing image AUROC (so by decreasing map objective).
    """
    finite = [p for p in points if math.isfinite(p["val_image_auroc"]) and math.isfinite(p["map_objective"])]
    # by image AUROC descending, map objective descending, then given order (the sort is stable):
    # a point is on the front iff its map objective beats every point before it
    ranked = sorted(finite, key=lambda p: (-p["val_image_auroc"], -p["map_objective"]))
    front, best_map = [], -math.inf
    for p in ranked:
        if p["map_objective"] > best_map:
            front.append(p)
            best_map = p["map_objective"]
    return front[::-1]


def pareto_choice(front: list[dict], reference: dict) -> dict | None:
    """The one setting taken from a Pareto front: the highest validation image AUROC among the front
    points whose validation map objective is at least the reference's (the default K and alpha on the
    same validation images), so the map is never worse than the default's; if none is, the point with
    the highest map objective.

    Args:
        front: `pareto_front`'s points.
        reference: a dict with ``map_objective`` (e.g. `coupled_validation` of the default).

    Returns:
        A point of `front`, or None when the front is empty.
    """
    if not front:
        return None
    good = [p for p in front if p["map_objective"] >= reference["map_objective"]]
    if good:
        return max(good, key=lambda p: p["val_image_auroc"])  # the first of equals (on a front: the same point)
    return max(front, key=lambda p: p["map_objective"])


def validation_calibration(c: ClassTables, k: int, alpha: float, tune: TuneConfig,
                           scoring: ScoringConfig) -> Calibration:
    """The image threshold and normalisation of LDKNN (K, alpha) from the class's VALIDATION scores."""
    scores = image_scores(ldknn_maps(c.val, k, alpha, scoring.squared), scoring.image_score)
    kind = c.split.get("kind", "validation") if isinstance(c.split, dict) else "validation"
    source = (f"{c.category} {kind} validation: {int((c.val_labels == 0).sum())} normal, "
              f"{int((c.val_labels == 1).sum())} anomalous")
    return calibrate(c.val_labels, scores, tune.threshold, tune.quantile, source)


def reported_metrics(c: ClassTables, k: int, alpha: float, scoring: ScoringConfig,
                     map_setting: ScoringMethod | None = None,
                     calibration: Calibration | None = None) -> dict[str, float]:
    """Metrics on the class's reported test images only: image metrics of LDKNN at (K, alpha), pixel
    metrics of `map_setting`'s maps (default: the same LDKNN maps), and precision, recall and F1 at
    `calibration`'s threshold when given (next to `image_f1`, the best F1 any threshold reaches)."""
    maps = c.test_ldknn_maps(k, alpha, scoring.squared)
    scores = image_scores(maps, scoring.image_score)
    metrics = evaluate(c.test_labels, scores, c.test_types)
    if calibration is not None:
        metrics.update({f"{name}_at_threshold": v for name, v in
                        threshold_metrics(c.test_labels, scores, calibration.threshold).items()})
        metrics["threshold"] = calibration.threshold
    if c.test_masks is None or not scoring.pixel_metrics:
        return metrics
    if map_setting is not None:
        table = c.test_table(map_setting.k if map_setting.name == "knn" else 1)
        maps = method_maps(table, map_setting.name, map_setting.k, map_setting.alpha, scoring.squared)
    keep = np.ones(len(c.test_labels), bool) if c.test_has_mask is None else c.test_has_mask
    ids = np.flatnonzero(keep)
    pixel = pixel_maps(maps[ids], c.test_masks.shape[-1], scoring.sigma)
    pixel_metrics = evaluate(c.test_labels[ids], scores[ids], [c.test_types[i] for i in ids], c.test_masks[ids], pixel)
    metrics.update({k: v for k, v in pixel_metrics.items() if k.startswith(("pixel_", "aupro"))})
    return metrics


def write_selection(out_dir: Path, selections: list[Selection], rows: list[dict], splits: dict, glob: dict) -> None:
    """selection.json / selection.csv (the per-class K and alpha), results.json, splits.json, atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"per_class": {s.category: selection_record(s) for s in selections}, "global": glob}
    write_text_atomic(out_dir / "selection.json", json.dumps(payload, indent=1))
    nan = float("nan")
    columns = ["category", "k", "alpha", "val_image_auroc", "val_pixel_auroc", "trials", "map_method",
               "val_map_objective", "threshold"]
    table = [dict(zip(columns, (  # a map spec has commas (ldknn:k=9,alpha=0.1): the csv module quotes it
        s.category, s.k, f"{s.alpha:.4f}", f"{s.val_metrics.get('val_image_auroc', nan):.4f}",
        f"{s.val_metrics.get('val_pixel_auroc', nan):.4f}", s.trials, s.map.spec if s.map else "",
        f"{s.map_val_metrics.get('map_objective', nan):.4f}", f"{s.calibration.get('threshold', nan):.6g}")))
        for s in selections]
    write_text_atomic(out_dir / "selection.csv", to_csv(table, columns))
    write_text_atomic(out_dir / "results.json", json.dumps({"results": rows}, indent=1))
    write_text_atomic(out_dir / "splits.json", json.dumps(splits, indent=1))


def selection_record(s: Selection) -> dict:
    """A class's choice as selection.json holds it (what `reb fit --selection` reads back)."""
    out = {"k": s.k, "alpha": s.alpha, **s.val_metrics, "trials": s.trials}
    if s.map is not None:
        out.update(map_method=s.map.spec, **s.map_val_metrics, map_trials=s.map_trials)
    if s.calibration:
        out["calibration"] = s.calibration
    if s.held_out_train:
        out["held_out_train"] = s.held_out_train
    if s.pareto_choice is not None:
        out.update(pareto=s.pareto, pareto_choice=s.pareto_choice)
    return out
