"""Fit a detector on a category and score its test set with one or more methods: one feature pass,
one bank, one search for all methods.

This is the single-process path every command uses (fit, evaluate, benchmark, sweep cells); the
Ray layers distribute the same steps.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import closing
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from reb_dist.config import DataConfig, RunConfig, ScoringConfig
from reb_dist.core.detector import Detector
from reb_dist.detectors import build_detector
from reb_dist.core.ldknn import ScoringMethod, parse_method
from reb_dist.core.metrics import evaluate
from reb_dist.errors import ConfigError, DatasetError
from reb_dist.io.data import (ClassSplit, ImageDataset, Sample, check_split, few_shot, list_categories, load_split,
                              sample_mask)
from reb_dist.io.feature_cache import FeatureCache, extraction_settings, graph_folder
from reb_dist.results import CategoryResult, MethodResult
from reb_dist.pipelines.bank import BankPlacement, placed_index_factory

log = logging.getLogger(__name__)


def categories_of(data: DataConfig) -> list[str]:
    """The categories a run covers: data.categories, else every category found under the root.

    Raises:
        DatasetError: the root holds no category (e.g. it is a category folder itself: the message
            then says which --root and --categories to use).
    """
    if data.layout == "folder":  # one custom set; its name is the category
        return data.categories[:1] or [data.resolved_root().name]
    return data.categories or list_categories(data.layout, data.resolved_root())


def load_category(data: DataConfig, category: str) -> ClassSplit:
    """The category's split, few-shot applied, every file opened once when `check_files` (images too
    small for `data.image_size` refused then).

    Raises:
        ConfigError: data.few_shot asks for more training images than the category has.
        DatasetError: a folder or file of the category cannot be used.
    """
    folders = {}
    if data.layout == "folder":
        folders = dict(train_dir=data.train_dir, test_normal_dir=data.test_normal_dir,
                       test_anomalous_dir=data.test_anomalous_dir, mask_dir=data.mask_dir)
    split = load_split(data.layout, data.resolved_root(), category, **folders)
    return _few_shot_and_checked(split, data, f"category '{split.name}' has ({len(split.train)} in {split.root})")


def _few_shot_and_checked(split: ClassSplit, data: DataConfig, available: str) -> ClassSplit:
    """`data.few_shot` applied to the split's training images (`available` says how many there are,
    for the error), and every file opened once when `data.check_files`."""
    if data.few_shot:
        if data.few_shot > len(split.train):  # the setting is what to change, so name it
            raise ConfigError(f"data.few_shot={data.few_shot} asks for more training images than {available}; "
                              f"allowed: 1 to {len(split.train)}, or 0 for all of them")
        split.train = few_shot(split.train, data.few_shot)
    if data.check_files:
        check_split(split, resize_to=data.image_size)
    return split


def images_split(images: list[str | Path], name: str, data: DataConfig) -> ClassSplit:
    """A category made of the good images a user has (files and folders of them): its training images
    are all of them, it has no test set. Few-shot and the file checks apply as in `load_category`.

    Raises:
        DatasetError: no images found, or some cannot be used.
    """
    from reb_dist.pipelines.predict import find_images

    paths = find_images(images)
    root = Path(os.path.commonpath([str(p.absolute().parent) for p in paths]))
    split = ClassSplit(name, root, [Sample(p, 0) for p in paths], [], layout="images")
    return _few_shot_and_checked(split, data, f"the {len(paths)} given")


def images_category(images: list[str | Path], data: DataConfig) -> str:
    """The category name of a model fitted from images: data.categories' one name, else the folder of
    the first image given (a folder itself, or a file's parent), above folders named train, good, ..."""
    if len(data.categories) > 1:
        raise ConfigError(f"--images makes one model; data.categories names {len(data.categories)} categories")
    if data.categories:
        return data.categories[0]
    first = Path(images[0]).absolute()
    folder = first if first.is_dir() else first.parent
    while folder.name.lower() in GENERIC_FOLDERS and folder.parent != folder:  # my_pills/train/good -> my_pills
        folder = folder.parent
    return folder.name or "images"


# folder names that say what the images are for, not what they show
GENERIC_FOLDERS = {"train", "good", "normal", "ok", "images", "img", "imgs"}


def load_categories(data: DataConfig, categories: list[str]) -> dict[str, tuple[ClassSplit, float]]:
    """Every category's split (`load_category`) and the seconds it took, all loaded and checked before
    any is computed: a bad file in the last category then stops a run before hours spent on the first.

    Raises:
        DatasetError, ConfigError: as the first category with a problem raises it; the message also
            names every other category's problem, since each category is checked even after one fails.
    """
    loaded, errors = {}, []
    for category in categories:
        start = time.perf_counter()
        try:
            loaded[category] = (load_category(data, category), time.perf_counter() - start)
        except (DatasetError, ConfigError) as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        first, others = errors[0], "".join(f"\n{e}" for e in errors[1:])
        if isinstance(first, DatasetError):
            raise DatasetError(first.path, f"{first.problem}{others}") from first
        raise ConfigError(f"{first}{others}") from first
    return loaded


def check_bank_size(scoring: ScoringConfig, bank_size: int, split: ClassSplit, coreset_ratio: float = 1.0) -> None:
    """Refuse a K the bank cannot serve, before any density or neighbour search reads past its end.

    A density is the mean distance to the K nearest *other* bank points, so every K in use (scoring.k,
    whose densities a saved model carries, and each method spec's own k=) must be below the bank size.

    Raises:
        ConfigError: naming the setting with the largest K, the bank size and how it came about.
    """
    wanted = [("scoring.k", scoring.k)]
    wanted += [(named, parse_method(spec, scoring.k).k) for named, spec in scoring.named_specs()]
    named, k = max(wanted, key=lambda w: w[1])
    if k >= bank_size:
        raise ConfigError(f"{named}: K={k} needs a memory bank of more than {k} points, but the bank of "
                          f"'{split.name}' has {bank_size} ({len(split.train)} training image(s), "
                          f"bank.coreset_ratio={coreset_ratio:g}); allowed: K up to {bank_size - 1}, or more "
                          f"training images (data.few_shot) or a larger bank.coreset_ratio")


def coreset_neighbour_warnings(scoring: ScoringConfig, coreset_ratio: float) -> list[str]:
    """Why each method that reads K > 1 neighbours of a test patch is not to be trusted on a coreset bank.

    A k-center coreset keeps one point where the full bank had many, so a patch's K nearest coreset
    points reach far past its K nearest training patches and a mean over them follows the coreset's
    spacing more than the patch. Measured on pill with the fast preset (coreset 0.1): knn(k=20) 61.4
    image AUROC against 90.7 with the full bank, knn(k=9) 84.3 against 94.3 on fine-tuned features,
    while nn1 and ldknn stayed within 0.7 (docs/RESULTS.md section 2). ldknn, nn1 and gde read one.
    """
    if coreset_ratio >= 1.0:
        return []
    methods = [parse_method(spec, scoring.k) for _, spec in scoring.named_specs()]
    return [f"{m.label} reads the {m.query_neighbours} nearest bank points of each test patch, but the bank is a "
            f"coreset (bank.coreset_ratio={coreset_ratio:g}): its scores are measured to mislead there (pill: "
            f"knn(k=20) 61.4 image AUROC against 90.7 with the full bank, docs/RESULTS.md section 2); use ldknn or "
            f"nn1 on a coreset, or bank.coreset_ratio=1 for this method's figures"
            for m in methods if m.query_neighbours > 1]


def loader(samples: list[Sample], data: DataConfig, with_masks: bool = False,
           image_size: int | None = None) -> DataLoader:
    """Batches of preprocessed images (and masks) in the given order, at `image_size` or data.image_size."""
    return DataLoader(ImageDataset(samples, image_size or data.image_size, with_masks=with_masks),
                      batch_size=data.batch_size, num_workers=data.num_workers, shuffle=False)


def extract_with_masks(detector: Detector, samples: list[Sample], data: DataConfig, desc: str = "features",
                       cache: FeatureCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w, D) features and (N, H, W) bool masks of samples (all-False where there is none).

    With a `cache`, features of images it holds are read from it (their masks still from the mask
    files, without the backbone); the others are extracted and stored.
    """
    return extract_samples(detector, samples, data, desc, cache, with_masks=True)


def extract_samples(detector: Detector, samples: list[Sample], data: DataConfig, desc: str = "features",
                    cache: FeatureCache | None = None,
                    with_masks: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, h, w, D) features of samples, through `cache` when given, and their masks if `with_masks`.

    The detector's timings count real extraction as "features" and cache work (hashing, reading,
    writing, masks of cached images) as "feature_cache".
    """
    if cache is None or not samples:
        return _extract(detector, samples, data, desc, with_masks)
    start = time.perf_counter()
    settings = extraction_settings(detector)
    keys = [_cache_key(cache, settings, s) for s in samples]
    found = [cache.lookup(k) if k is not None else None for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    masks = [sample_mask(s, detector.image_size) if with_masks and f is not None else None
             for s, f in zip(samples, found)]
    detector.timings.seconds.setdefault("features", 0.0)  # the stage shows even when everything hits
    detector.timings.add("feature_cache", start)
    if missing:
        fresh, fresh_masks = _extract(detector, [samples[i] for i in missing], data, desc, with_masks)
        start = time.perf_counter()
        for j, i in enumerate(missing):
            if keys[i] is not None:
                cache.store(keys[i], fresh[j])
            found[i] = fresh[j]
            if with_masks:
                masks[i] = fresh_masks[j]
        detector.timings.add("feature_cache", start)
        if len(missing) == len(samples):
            return fresh, fresh_masks
    return np.stack(found), (np.stack(masks) if with_masks else None)


def _extract(detector: Detector, samples: list[Sample], data: DataConfig, desc: str,
             with_masks: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the backbone over samples (the uncached path)."""
    batches = loader(samples, data, with_masks=with_masks, image_size=detector.image_size)
    masks = []

    def images_and_masks():
        for batch in batches:
            if with_masks:
                masks.append(batch["mask"][:, 0].numpy() > 0.5)
            yield batch

    features = detector.extract(images_and_masks(), total=len(batches), desc=desc)
    return features, (np.concatenate(masks) if with_masks else None)


def _cache_key(cache: FeatureCache, settings: dict, sample: Sample) -> str | None:
    """The sample's cache key; None when its file cannot be read (extraction then names the error)."""
    try:
        return cache.key(settings, sample.image_path)
    except OSError:
        return None


def fit_detector(cfg: RunConfig, split: ClassSplit, placement: BankPlacement | None = None) -> Detector:
    """A detector fitted on the split's training images, its bank held as `cfg.bank` says (on Ray
    actors through `placement`, which the commands give when bank.shards >= 1).

    Training features come through the feature cache `cfg.cache` describes (none when disabled).
    """
    detector = build_detector(cfg.backbone, cfg.scoring, cfg.data.image_size, cfg.bank,
                              placed_index_factory(cfg.bank, split.name, placement), graph_folder(cfg.cache))
    train, _ = extract_samples(detector, split.train, cfg.data, f"{split.name} train features",
                               FeatureCache.from_config(cfg.cache))
    detector.fit_features(train)
    detector.train_images = [str(s.image_path) for s in split.train]  # in the bank's order: its provenance
    try:
        check_bank_size(cfg.scoring, len(detector.bank), split, cfg.bank.coreset_ratio)
    except ConfigError:
        detector.close()  # a sharded bank's actors are stopped
        raise
    for warning in coreset_neighbour_warnings(cfg.scoring, cfg.bank.coreset_ratio):
        log.warning(f"{split.name}: {warning}")
    return detector


def evaluate_category(cfg: RunConfig, category: str, detector: Detector | None = None,
                      methods: list[ScoringMethod] | None = None, examples: int = 0,
                      split: ClassSplit | None = None, load_s: float = 0.0,
                      placement: BankPlacement | None = None) -> CategoryResult:
    """Fit (unless a fitted detector is given), score the test set with every method, compute metrics.

    Args:
        cfg: the run's settings (data always; backbone, scoring and bank when fitting here).
        category: the category to evaluate.
        detector: a fitted detector (e.g. a loaded model): its own image size and scoring are used.
        methods: what to score with (default: the detector's configured methods).
        examples: how many test images keep their pixel maps for heatmap galleries.
        split: the category's split, already loaded and checked (`load_categories`), taking `load_s`
            seconds; None loads it here.
        placement: where a bank fitted here is indexed (`fit_detector`).

    Returns:
        The category's result; a detector fitted here is closed again (its shard actors stopped).
    """
    start = time.perf_counter() - (load_s if split is not None else 0.0)  # "total" includes the loading
    if split is None:
        split = load_category(cfg.data, category)
        load_s = time.perf_counter() - start
    cache = FeatureCache.from_config(cfg.cache)
    if detector is not None:
        return score_test_set(detector, split, cfg.data, methods, examples, start, load_s, cache)
    with closing(fit_detector(cfg, split, placement)) as fitted:
        return score_test_set(fitted, split, cfg.data, methods, examples, start, load_s, cache)


def score_test_set(detector: Detector, split: ClassSplit, data: DataConfig,
                   methods: list[ScoringMethod] | None = None, examples: int = 0,
                   start: float | None = None, load_s: float = 0.0,
                   cache: FeatureCache | None = None) -> CategoryResult:
    """Score a split's test images with a fitted detector and compute every metric.

    Pixel metrics (over normal images and anomalous ones with a mask) are computed when the split has
    masks and the detector's `scoring.pixel_metrics` is on. Test features go through `cache` if given.
    """
    start = time.perf_counter() if start is None else start
    methods = methods or detector.methods()
    test, masks = extract_with_masks(detector, split.test, data, desc=f"{split.name} test features", cache=cache)
    labels = np.array([s.label for s in split.test])
    types = [s.defect_type for s in split.test]
    groups = [s.group for s in split.test]
    pixel = detector.scoring.pixel_metrics and split.has_masks
    has_mask = pixel_countable(split.test)
    example_ids = example_indices(labels, examples)

    results = []
    for method, scores in detector.score_features(test, methods).items():
        t0 = time.perf_counter()
        maps = detector.pixel_maps(scores.patch_maps) if pixel or example_ids else None
        metrics = evaluate(labels, scores.image_scores, types, groups=groups)
        if pixel:
            keep = np.flatnonzero(has_mask)
            pixel_metrics = evaluate(labels[keep], scores.image_scores[keep], [types[i] for i in keep],
                                     masks[keep], maps[keep], [groups[i] for i in keep])
            metrics.update({k: v for k, v in pixel_metrics.items() if k.startswith(("pixel_", "aupro"))})
        metrics.update(recall_metrics(detector))
        detector.timings.add("metrics", t0)
        results.append(MethodResult(method, metrics, scores.image_scores,
                                    [(i, maps[i]) for i in example_ids] if maps is not None else []))
    timings = {"load_and_check": load_s, **detector.timings.seconds, "total": time.perf_counter() - start}
    return CategoryResult(split.name, split, labels, types, results, timings, len(detector.bank),
                          detector.bank.shape[1], detector.image_size, search_mode=detector.search_mode)


def recall_metrics(detector: Detector) -> dict[str, float]:
    """The recall against exact of the detector's approximate searches, at the largest K measured:
    query_recall (test patches) and density_recall (the bank self-search densities come from), each
    with its K. Empty for exact searches, so an approximate figure is never mistaken for an exact one."""
    out = {}
    for name, measured in (("query_recall", detector.query_recall), ("density_recall", detector.density_recall)):
        if measured:
            k, recall = max(measured.items())
            out.update({name: recall, f"{name}_k": float(k)})
    return out


def pixel_countable(samples: list[Sample]) -> np.ndarray:
    """(n,) bool: the samples pixel metrics count: normal images, and anomalous ones with a mask."""
    return np.array([s.label == 0 or s.mask_path is not None for s in samples])


def example_indices(labels: np.ndarray, n: int) -> list[int]:
    """Up to n test images for heatmap galleries: mostly anomalous, a few normal, spread evenly."""
    if n <= 0:
        return []
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_good = min(len(good), max(1, n // 4))
    n_bad = min(len(bad), n - n_good)
    pick = lambda ids, m: ids[np.linspace(0, len(ids) - 1, m).round().astype(int)] if m else ids[:0]
    return sorted(set(pick(bad, n_bad).tolist() + pick(good, n_good).tolist()))
