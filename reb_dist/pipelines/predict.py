"""Score new images with a fitted detector: image scores and pixel maps, in batches.

One loop (`predict`) reads the images, refuses too-small ones, batches the others, and makes the
predictions (scores, maps, normalised scores and flags in float64); what scores a batch is an
`ImageScorer`: the in-process `Detector` (through `DetectorScorer`) or an exported file
(`reb_dist.export.predict.ExportedScorer`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from reb_dist.core.detector import Detector
from reb_dist.core.thresholds import Calibration, normalise
from reb_dist.errors import DatasetError
from reb_dist.results import Prediction
from reb_dist.io.data import is_image_file, preprocess, read_image
from reb_dist.io.data.images import check_image_side

log = logging.getLogger(__name__)


def find_images(items: Iterable[str | Path]) -> list[Path]:
    """Image files given directly, and every image under given folders (sorted)."""
    paths: list[Path] = []
    for item in map(Path, items):
        paths += sorted(p for p in item.rglob("*") if is_image_file(p)) if item.is_dir() else [item]
    if not paths:
        raise DatasetError(" ".join(map(str, items)) or ".", "no images found")
    return paths


OVERLAY_SUFFIX = "_heatmap.png"  # what write_predictions names its overlays: <stem>[-N]_heatmap.png


def check_output_folder(output: str | Path) -> None:
    """DatasetError when `output` is an existing file: checked before any work, not when writing."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise DatasetError(out, "is a file; --output must be a folder for the overlays and scores.csv")


def prediction_inputs(images: Iterable[str | Path], output: str | Path) -> list[Path]:
    """The images `reb predict` scores: `find_images`, less the overlays of an earlier run into the
    same `output` folder (`-o` inside or equal to an input folder: they would be scored as new images).

    Raises:
        DatasetError: `output` is an existing file (checked before any work), or no images are found.
    """
    check_output_folder(output)
    out = Path(output).resolve()
    paths = find_images(images)
    own = [p for p in paths if p.name.endswith(OVERLAY_SUFFIX) and p.resolve().parent == out]
    if own:
        log.info("skipping %d overlays of an earlier run in %s (the output folder)", len(own), out)
        paths = [p for p in paths if p not in own]
    if not paths:
        raise DatasetError(" ".join(map(str, images)), "no images found besides earlier overlays")
    return paths


@runtime_checkable
class ImageScorer(Protocol):
    """What `predict` scores a batch with: the image size it reads images at, the calibration that
    normalises its scores (None: none), and the scoring itself."""

    image_size: int
    calibration: Calibration | None

    def score_images(self, images: list[np.ndarray]) -> tuple:
        """(B,) image scores and (B, S, S) pixel maps (S = `image_size`) of B uint8 (H, W, 3) RGB
        images, each at least `image_size` on its shorter side; optionally a third item, each image's
        nearest training patch (`reb_dist.core.detector.NearestPatch` or None)."""
        ...


class DetectorScorer:
    """A fitted `Detector` as an `ImageScorer`: its default method (with its map method), the
    images preprocessed as in training, features extracted as one batch."""

    def __init__(self, detector: Detector):
        self.detector = detector
        self.method = detector.default_method

    @property
    def image_size(self) -> int:
        return self.detector.image_size

    @property
    def calibration(self) -> Calibration | None:
        return self.detector.calibration

    def score_images(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list]:
        detector, method = self.detector, self.method
        batch = torch.stack([preprocess(im, detector.image_size) for im in images])
        features = detector.extract([batch], desc="predict")
        scores = detector.score_features(features, [method])[method]
        # the image method's patch map: its hottest patch is what set the image score
        nearest = detector.nearest_training_patches(features, scores.patch_maps)
        return scores.image_scores, detector.pixel_maps(scores.patch_maps), nearest


def predict(detector: Detector | ImageScorer, paths: list[Path | np.ndarray], batch_size: int = 16,
            threshold: float | None = None) -> list[Prediction]:
    """Score images with the detector's first configured method, and flag them.

    Args:
        detector: a fitted detector (e.g. from `reb_dist.io.model_file.load_model`), or any other
            `ImageScorer` (an exported file: `reb_dist.export.predict.ExportedScorer`).
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
    scorer = detector if isinstance(detector, ImageScorer) else DetectorScorer(detector)
    calibration = scorer.calibration
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
                check_image_side(f"image {s + i}" if in_memory else p, images[i].shape[1::-1], scorer.image_size)
            except DatasetError as exc:  # one bad file must not cost the others their scores
                images.pop(i, None)
                done[i] = Prediction(None if in_memory else p, None, float("nan"), None, error=exc.problem)
        if images:
            scores, maps, *more = scorer.score_images(list(images.values()))
            nearest = more[0] if more else [None] * len(scores)
            for (i, image), score, pixel_map, near in zip(images.items(), scores, maps, nearest):
                score = float(score)  # compare in float64, as the threshold was computed (not float32)
                normalised = None if calibration is None else float(normalise(score, calibration))
                flagged = None if threshold is None else score >= threshold
                path = None if isinstance(chunk[i], np.ndarray) else chunk[i]
                done[i] = Prediction(path, image, score, pixel_map, normalised, flagged, nearest=near)
        out += [done[i] for i in range(len(chunk))]
    return out
