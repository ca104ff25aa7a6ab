"""Score new images with a fitted detector: image scores and pixel maps, in batches."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from reb_dist.core.detector import Detector
from reb_dist.core.thresholds import normalise
from reb_dist.errors import DatasetError
from reb_dist.results import Prediction
from reb_dist.io.data import is_image_file, preprocess, read_image
from reb_dist.io.data.images import check_image_side


def find_images(items: Iterable[str | Path]) -> list[Path]:
    """Image files given directly, and every image under given folders (sorted)."""
    paths: list[Path] = []
    for item in map(Path, items):
        paths += sorted(p for p in item.rglob("*") if is_image_file(p)) if item.is_dir() else [item]
    if not paths:
        raise DatasetError(" ".join(map(str, items)) or ".", "no images found")
    return paths


def predict(detector: Detector, paths: list[Path | np.ndarray], batch_size: int = 16,
            threshold: float | None = None) -> list[Prediction]:
    """Score images with the detector's first configured method, and flag them.

    Args:
        detector: a fitted detector (e.g. from `reb_dist.io.model_file.load_model`).
        paths: image files, or images already in memory as uint8 (H, W, 3) RGB arrays (named
            "image <i>" in errors, where i is their place in `paths`).
        batch_size: images per feature batch.
        threshold: flag images whose score is at least this; default the detector's calibration
            threshold, and no flags (`anomalous` None) when it has no calibration either. The
            normalised score always uses the calibration as saved, whatever the threshold, so it
            stays on one fixed scale.

    Returns:
        One prediction per path, in order; a file that cannot be read or is too small for the
        detector's image size gets one with `error` set, and the others are scored all the same.
    """
    method = detector.default_method
    calibration = detector.calibration
    if threshold is None and calibration is not None:
        threshold = calibration.threshold
    out = []
    for s in range(0, len(paths), batch_size):
        chunk = paths[s:s + batch_size]
        images: dict[int, np.ndarray] = {}
        done: dict[int, Prediction] = {}
        for i, p in enumerate(chunk):
            in_memory = isinstance(p, np.ndarray)
            try:
                images[i] = p if in_memory else read_image(p)
                check_image_side(f"image {s + i}" if in_memory else p, images[i].shape[1::-1], detector.image_size)
            except DatasetError as exc:  # one bad file must not cost the others their scores
                images.pop(i, None)
                done[i] = Prediction(None if in_memory else p, None, float("nan"), None, error=exc.problem)
        if images:
            batch = torch.stack([preprocess(im, detector.image_size) for im in images.values()])
            scores = detector.score_features(detector.extract([batch], desc="predict"), [method])[method]
            for (i, image), score, pixel_map in zip(images.items(), scores.image_scores,
                                                   detector.pixel_maps(scores.patch_maps)):
                score = float(score)  # compare in float64, as the threshold was computed (not float32)
                normalised = None if calibration is None else float(normalise(score, calibration))
                flagged = None if threshold is None else score >= threshold
                path = None if isinstance(chunk[i], np.ndarray) else chunk[i]
                done[i] = Prediction(path, image, score, pixel_map, normalised, flagged)
        out += [done[i] for i in range(len(chunk))]
    return out
