"""From a fitted `Detector` to an `ExportedDetector` and the metadata a runtime needs beside it."""

from __future__ import annotations

import numpy as np

from reb_dist.version import __version__
from reb_dist.core.detector import Detector
from reb_dist.core.ldknn import ScoringMethod
from reb_dist.errors import RebError
from reb_dist.export.module import (EXPORTABLE_METHODS, IMAGENET_MEAN, IMAGENET_STD, OUTPUT_NAMES, ExportableFeatures,
                                    ExportedDetector, Threshold)
from reb_dist.export.runtime import EXPORT_FORMAT

# what a runtime must do to an image before the exported model sees it (the model does the rest)
PREPROCESSING = ("read the image as 8-bit RGB (grey replicated, alpha dropped; 16-bit grey scaled by 1/257); "
                 "resize it to image_size x image_size with PIL's bicubic filter (Image.Resampling.BICUBIC), "
                 "ignoring the aspect ratio; stack as uint8 (batch, image_size, image_size, 3). No scaling or "
                 "ImageNet normalisation: the model divides by 255 and normalises with mean/std itself.")


class ExportError(RebError, ValueError):
    """A model cannot be exported (a scoring method the exported module does not compute...)."""


def exportable(method: ScoringMethod, model: str) -> ScoringMethod:
    """One (image or map) method, without a map of its own, with plain Python values for the traced
    graph's constants; ExportError for one the module cannot compute."""
    if method.name not in EXPORTABLE_METHODS:
        raise ExportError(f"{model}: scoring method {method.label!r} cannot be exported; exportable methods: "
                          f"{', '.join(EXPORTABLE_METHODS)} (set scoring.methods / scoring.map_method and fit again)")
    return ScoringMethod(method.name, int(method.k), float(method.alpha), bool(method.squared))


def build_module(detector: Detector, model: str = "model") -> ExportedDetector:
    """The detector's default method (with its map method) as one CPU module in eval mode.

    Args:
        detector: a fitted detector (e.g. `load_model(path, device="cpu")`).
        model: the model file's name, for errors.

    Raises:
        ExportError: the method (or its map method) is not one of EXPORTABLE_METHODS, or the
            detector has no bank.
    """
    if detector.bank is None:
        raise ExportError(f"{model}: the detector has no memory bank")
    method = detector.default_method
    image, map_method = exportable(method.image, model), exportable(method.map_method, model)
    densities = {m.k: np.asarray(detector.compute_density(m.k), np.float32)
                 for m in (image, map_method) if m.name == "ldknn"}
    if not all(np.isfinite(d).all() for d in densities.values()):
        raise ExportError(f"{model}: some bank densities are not finite")
    cal = detector.calibration
    threshold = None if cal is None else Threshold.of(cal.threshold, cal.low, cal.high)
    features = ExportableFeatures(detector.features.to("cpu").eval(), detector.backbone.channels)
    module = ExportedDetector(features, detector.bank, image, map_method, densities, detector.scoring.image_score,
                              detector.scoring.sigma, detector.image_size, threshold)
    return module.eval()


def export_metadata(detector: Detector, runtime: str, file_name: str, source: str | None = None) -> dict:
    """What a runtime needs to know beside the exported file: input, preprocessing, outputs, method,
    calibration (JSON-able)."""
    s = detector.image_size
    cal = detector.calibration
    return {
        "format": EXPORT_FORMAT,
        "reb_dist_version": __version__,
        "runtime": runtime,
        "file": file_name,
        "source_model": source,
        "method": detector.default_method.label,
        "image_score": detector.scoring.image_score,
        "sigma": detector.scoring.sigma,
        "bank_size": int(len(detector.bank)),
        "backbone": {"name": detector.backbone.name, "weights": detector.backbone.weights_source,
                     "fingerprint": detector.backbone.fingerprint,
                     "aggregation": detector.aggregation},
        "image_size": s,
        "input": {"name": "images", "shape": ["batch", s, s, 3], "dtype": "uint8", "layout": "NHWC, RGB"},
        "preprocessing": PREPROCESSING,
        "normalisation_inside": {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "outputs": {
            OUTPUT_NAMES[0]: "(batch,) float32 image scores (higher = more anomalous)",
            OUTPUT_NAMES[1]: "(batch,) float32 scores normalised by the calibration (0.5 = threshold); NaN without one",
            OUTPUT_NAMES[2]: "(batch,) bool: score >= the calibrated threshold; all False without a calibration",
            OUTPUT_NAMES[3]: f"(batch, {s}, {s}) float32 anomaly maps (raw scores, blurred with sigma)",
        },
        "calibration": None if cal is None else cal.to_dict(),
    }
