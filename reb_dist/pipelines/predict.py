"""Score new images with a fitted detector: image scores and pixel maps, in batches."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reb_dist.core.detector import Detector
from reb_dist.core.thresholds import normalise
from reb_dist.errors import DatasetError
from reb_dist.io.data import is_image_file, preprocess, read_image


@dataclass
class Prediction:
    """One image's prediction: its score and pixel map (at the detector's image size), and, when
    known, its normalised score and whether it is flagged anomalous."""

    path: Path
    image: np.ndarray  # the image as read, uint8 (H, W, 3)
    score: float
    pixel_map: np.ndarray  # (S, S) float32, S = the detector's image size
    # normalise(score, the model's calibration): 0..1, 0.5 at the calibrated threshold; None without one
    normalised_score: float | None = None
    # score >= the threshold used; None when there is none (no calibration and none given)
    anomalous: bool | None = None


def find_images(items: Iterable[str | Path]) -> list[Path]:
    """Image files given directly, and every image under given folders (sorted)."""
    paths: list[Path] = []
    for item in map(Path, items):
        paths += sorted(p for p in item.rglob("*") if is_image_file(p)) if item.is_dir() else [item]
    if not paths:
        raise DatasetError(" ".join(map(str, items)) or ".", "no images found")
    return paths


def predict(detector: Detector, paths: list[Path], batch_size: int = 16,
            threshold: float | None = None) -> list[Prediction]:
    """Score images with the detector's first configured method, and flag them.

    Args:
        detector: a fitted detector (e.g. from `reb_dist.io.model_file.load_model`).
        paths: image files.
        batch_size: images per feature batch.
        threshold: flag images whose score is at least this; default the detector's calibration
            threshold, and no flags (`anomalous` None) when it has no calibration either. The
            normalised score always uses the calibration as saved, whatever the threshold, so it
            stays on one fixed scale.

    Returns:
        One prediction per path, in order.
    """
    method = detector.default_method
    calibration = detector.calibration
    if threshold is None and calibration is not None:
        threshold = calibration.threshold
    out = []
    for s in range(0, len(paths), batch_size):
        chunk = paths[s:s + batch_size]
        images = [read_image(p) for p in chunk]
        batch = torch.stack([preprocess(im, detector.image_size) for im in images])
        scores = detector.score_features(detector.extract([batch], desc="predict"), [method])[method]
        for p, image, score, pixel_map in zip(chunk, images, scores.image_scores,
                                              detector.pixel_maps(scores.patch_maps)):
            score = float(score)  # compare in float64, as the threshold was computed (not float32)
            normalised = None if calibration is None else float(normalise(score, calibration))
            flagged = None if threshold is None else score >= threshold
            out.append(Prediction(p, image, score, pixel_map, normalised, flagged))
    return out
