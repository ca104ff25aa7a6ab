"""Evaluate one or more scoring methods on one category: one feature pass, one bank, one search.

This is the single-process path every command uses (fit, evaluate, benchmark); the Ray layers
distribute the same steps.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from reb_dist.config import DataConfig, RunConfig
from reb_dist.io.data import ClassSplit, ImageDataset, check_split, few_shot, list_categories, load_split
from reb_dist.core.detector import Detector
from reb_dist.core.ldknn import ScoringMethod
from reb_dist.core.metrics import evaluate


@dataclass
class MethodResult:
    method: ScoringMethod
    metrics: dict[str, float]
    image_scores: np.ndarray
    examples: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (test index, pixel map)


@dataclass
class CategoryResult:
    category: str
    split: ClassSplit
    labels: np.ndarray
    defect_types: list[str]
    methods: list[MethodResult]
    timings: dict[str, float]
    bank_size: int
    feature_dim: int
    variant: str = ""  # "" for the configured weights, "defectmaker" for the fine-tuned ones

    def label(self, method: ScoringMethod) -> str:
        return f"{self.variant}+{method.label}" if self.variant else method.label


def categories_of(data: DataConfig) -> list[str]:
    if data.layout == "folder":  # one custom set; its name is the category
        return data.categories[:1] or [data.resolved_root().name]
    return data.categories or list_categories(data.layout, data.resolved_root())


def load_category(data: DataConfig, category: str) -> ClassSplit:
    """The category's split, few-shot applied, every file opened once when `check_files`."""
    folders = {}
    if data.layout == "folder":
        folders = dict(train_dir=data.train_dir, test_normal_dir=data.test_normal_dir,
                       test_anomalous_dir=data.test_anomalous_dir, mask_dir=data.mask_dir)
    split = load_split(data.layout, data.resolved_root(), category, **folders)
    if data.few_shot:
        split.train = few_shot(split.train, data.few_shot)
    if data.check_files:
        check_split(split)
    return split


def loader(samples, data: DataConfig, with_masks: bool = False) -> DataLoader:
    return DataLoader(ImageDataset(samples, data.image_size, with_masks=with_masks),
                      batch_size=data.batch_size, num_workers=data.num_workers, shuffle=False)


def shard_dir(cfg: RunConfig, category: str) -> Path:
    """Where a sharded bank's files go: bank.shard_dir/<category>, or under the run's output folder."""
    return Path(cfg.bank.shard_dir or Path(cfg.output_dir) / "bank_shards") / category


def fit_detector(cfg: RunConfig, split: ClassSplit) -> Detector:
    detector = Detector.from_config(cfg.backbone, cfg.scoring, cfg.data.image_size, cfg.bank)
    batches = loader(split.train, cfg.data)
    train = detector.extract(batches, total=len(batches), desc=f"{split.name} train features")
    detector.fit_features(train, shard_dir=shard_dir(cfg, split.name))
    return detector


def evaluate_category(cfg: RunConfig, category: str, detector: Detector | None = None,
                      methods: list[ScoringMethod] | None = None, examples: int = 0) -> CategoryResult:
    """Fit (unless a fitted detector is given), score the test set with every method, compute metrics."""
    start = time.perf_counter()
    split = load_category(cfg.data, category)
    load_s = time.perf_counter() - start
    if detector is not None:
        return _score_test_set(cfg, category, split, detector, methods, examples, start, load_s)
    with closing(fit_detector(cfg, split)) as fitted:  # ours, so we stop a sharded bank's actors
        return _score_test_set(cfg, category, split, fitted, methods, examples, start, load_s)


def _score_test_set(cfg: RunConfig, category: str, split: ClassSplit, detector: Detector,
                    methods: list[ScoringMethod] | None, examples: int, start: float,
                    load_s: float) -> CategoryResult:
    methods = methods or detector.methods()

    batches = loader(split.test, cfg.data, with_masks=True)
    masks = []

    def images_and_masks():
        for batch in batches:
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
            yield batch

    test = detector.extract(images_and_masks(), total=len(batches), desc=f"{category} test features")
    masks = np.concatenate(masks)
    labels = np.array([s.label for s in split.test])
    types = [s.defect_type for s in split.test]
    groups = [s.group for s in split.test]
    pixel = cfg.scoring.pixel_metrics and split.has_masks
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in split.test])
    example_ids = _example_indices(labels, examples)

    results = []
    for method, scores in detector.score_features(test, methods).items():
        t0 = time.perf_counter()
        maps = detector.pixel_maps(scores.patch_maps) if pixel or example_ids else None
        metrics = evaluate(labels, scores.image_scores, types, groups=groups)
        if pixel:  # over normal images and anomalous ones that have a mask
            keep = np.flatnonzero(has_mask)
            pixel_metrics = evaluate(labels[keep], scores.image_scores[keep], [types[i] for i in keep],
                                     masks[keep], maps[keep], [groups[i] for i in keep])
            metrics.update({k: v for k, v in pixel_metrics.items() if k.startswith(("pixel_", "aupro"))})
        detector.timings.add("metrics", t0)
        results.append(MethodResult(method, metrics, scores.image_scores,
                                    [(i, maps[i]) for i in example_ids] if maps is not None else []))
    timings = {"load_and_check": load_s, **detector.timings.seconds,
               "total": time.perf_counter() - start}
    return CategoryResult(category, split, labels, types, results, timings,
                          len(detector.bank), detector.bank.shape[1])


def _example_indices(labels: np.ndarray, n: int) -> list[int]:
    """Up to n test images for heatmap galleries: mostly anomalous, a few normal, spread evenly."""
    if n <= 0:
        return []
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_good = min(len(good), max(1, n // 4))
    n_bad = min(len(bad), n - n_good)
    pick = lambda ids, m: ids[np.linspace(0, len(ids) - 1, m).round().astype(int)] if m else ids[:0]
    return sorted(set(pick(bad, n_bad).tolist() + pick(good, n_good).tolist()))

