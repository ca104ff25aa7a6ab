"""Score new images with a fitted detector: image scores and pixel maps, in batches."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reb_dist.core.detector import Detector
from reb_dist.errors import DatasetError
from reb_dist.io.data import is_image_file, preprocess, read_image


@dataclass
class Prediction:
    """One image's prediction: its score and pixel map (at the detector's image size)."""

    path: Path
    image: np.ndarray  # the image as read, uint8 (H, W, 3)
    score: float
    pixel_map: np.ndarray  # (S, S) float32, S = the detector's image size


def find_images(items: Iterable[str | Path]) -> list[Path]:
    """Image files given directly, and every image under given folders (sorted)."""
    paths: list[Path] = []
    for item in map(Path, items):
        paths += sorted(p for p in item.rglob("*") if is_image_file(p)) if item.is_dir() else [item]
    if not paths:
        raise DatasetError(" ".join(map(str, items)) or ".", "no images found")
    return paths


def predict(detector: Detector, paths: list[Path], batch_size: int = 16) -> list[Prediction]:
    """Score images with the detector's first configured method.

    Args:
        detector: a fitted detector (e.g. from `reb_dist.io.model_file.load_model`).
        paths: image files.
        batch_size: images per feature batch.

    Returns:
        One prediction per path, in order.
    """
    method = detector.default_method
    out = []
    for s in range(0, len(paths), batch_size):
        chunk = paths[s:s + batch_size]
        images = [read_image(p) for p in chunk]
        batch = torch.stack([preprocess(im, detector.image_size) for im in images])
        scores = detector.score_features(detector.extract([batch], desc="predict"), [method])[method]
        for p, image, score, pixel_map in zip(chunk, images, scores.image_scores,
                                              detector.pixel_maps(scores.patch_maps)):
            out.append(Prediction(p, image, float(score), pixel_map))
    return out
