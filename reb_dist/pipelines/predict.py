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
from reb_dist.io.data.images import check_image_side


@dataclass
class Prediction:
    """One image's prediction: its score and pixel map (at the detector's image size), and, when
    known, its normalised score and whether it is flagged anomalous.

    An image that could not be scored (unreadable, too small...) has `error` set, a NaN score and
    no image or pixel map.
    """

    path: Path | None  # None for an image given in memory (an array)
    image: np.ndarray | None  # the image as read, uint8 (H, W, 3); None when it could not be
    score: float
    pixel_map: np.ndarray | None  # (S, S) float32, S = the detector's image size; None on error
    # normalise(score, the model's calibration): 0..1, 0.5 at the calibrated threshold; None without one
    normalised_score: float | None = None
    # score >= the threshold used; None when there is none (no calibration and none given)
    anomalous: bool | None = None
    error: str | None = None  # why the image could not be scored; None when it was


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
