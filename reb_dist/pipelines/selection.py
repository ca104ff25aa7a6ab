"""Choosing LDKNN's K and alpha on a validation split: the pure part of `reb tune` (no Ray).

A class's bank is fitted once and its validation and reported test images searched once each; the
resulting `NeighbourTable`s give LDKNN maps for any (K, alpha) by a gather and a subtraction. Ray
Tune (reb_dist.distributed.tuning) searches per class over them; the global choice and the test
metrics are computed here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reb_dist.config import BackboneConfig, BankConfig, CacheConfig, DataConfig, ScoringConfig, TuneConfig
from reb_dist.core.anomaly_map import image_scores, pixel_maps
from reb_dist.core.detector import Detector
from reb_dist.core.ldknn.approx import query_recall as measure_query_recall
from reb_dist.core.ldknn.selection import NeighbourTable, ldknn_maps, neighbour_table, patch_masks, validation_objective
from reb_dist.core.metrics import evaluate
from reb_dist.io.atomic import write_text_atomic
from reb_dist.io.data import preprocess
from reb_dist.io.feature_cache import FeatureCache
from reb_dist.pipelines.bank import index_factory
from reb_dist.pipelines.evaluate import extract_samples, extract_with_masks, load_category
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
    query_recall: float | None = None  # recall@1 of an approximate test-patch search (None: exact)


@dataclass
class Selection:
    """One class's chosen (K, alpha), its validation metrics, and the search that chose it."""

    category: str
    k: int
    alpha: float
    val_metrics: dict
    trials: int
    seconds: float


def class_tables(category: str, data: DataConfig, backbone: BackboneConfig, scoring: ScoringConfig,
                 bank: BankConfig, tune: TuneConfig, saliency: str = "spectral",
                 cache: CacheConfig | None = None) -> ClassTables:
    """Split a class, fit its bank on what is left for training, and search the validation and the
    reported test images once each (K up to tune.k_max).

    Args:
        category: the class.
        data, backbone, scoring, bank: how to read images, extract features and hold the bank.
        tune: the validation split (kind, fraction, seed) and k_max.
        saliency: DefectMaker's saliency for synthetic validation anomalies.
        cache: the feature cache for the class's image files (None: no cache); synthetic validation
            images are always extracted.

    Returns:
        The class's neighbour tables, labels, masks and split record.
    """
    t0 = time.perf_counter()
    split = load_category(data, category)
    v = make_split(split, tune.validation, tune.fraction or None, tune.seed, data.image_size, saliency)
    detector = Detector.from_config(backbone, scoring, data.image_size, bank,
                                    index_factory(bank, bank.shard_dir or None))
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
        n, h, w, _ = val_feats.shape
        val_masks = patch_masks(val_pixel, h, w) if val_pixel.any() else None
        val_table = neighbour_table(detector.index, val_feats, tune.k_max, progress=f"{category} validation search")
        test_feats, test_masks = extract_with_masks(detector, v.test, data, "test", features_cache)
        test_table = neighbour_table(detector.index, test_feats, tune.k_max, progress=f"{category} test search")
        recall = None
        if detector.index.query_search != "exact":
            recall = measure_query_recall(detector.index, test_feats.reshape(-1, test_feats.shape[-1]), 1,
                                          bank.recall_sample, bank.seed)
    finally:
        detector.close()
    return ClassTables(category, val_table, val_labels, val_masks, test_table,
                       np.array([s.label for s in v.test]), test_masks if test_masks.any() else None,
                       [s.defect_type for s in v.test], v.record(),
                       {"tables": time.perf_counter() - t0, **detector.timings.seconds}, recall)


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


def reported_metrics(c: ClassTables, k: int, alpha: float, scoring: ScoringConfig) -> dict[str, float]:
    """Metrics of LDKNN at (K, alpha) on the class's reported test images only."""
    maps = ldknn_maps(c.test, k, alpha, scoring.squared)
    scores = image_scores(maps, scoring.image_score)
    if c.test_masks is None or not scoring.pixel_metrics:
        return evaluate(c.test_labels, scores, c.test_types)
    pixel = pixel_maps(maps, c.test_masks.shape[-1], scoring.sigma)
    return evaluate(c.test_labels, scores, c.test_types, c.test_masks, pixel)


def write_selection(out_dir: Path, selections: list[Selection], rows: list[dict], splits: dict, glob: dict) -> None:
    """selection.json / selection.csv (the per-class K and alpha), results.json, splits.json, atomically."""
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
