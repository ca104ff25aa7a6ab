"""`reb predict` with an exported file: the same predictions, overlays and scores.csv as with a
.safetensors model, scored by `reb_dist.export.runtime` instead of a `Detector`, through the same
loop (`reb_dist.pipelines.predict.predict`, with an `ExportedScorer`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from reb_dist.core.thresholds import Calibration
from reb_dist.errors import DatasetError, ModelFileError
from reb_dist.export.runtime import ExportedModel, load_exported, resize
from reb_dist.pipelines.predict import Prediction, prediction_inputs, predict

log = logging.getLogger(__name__)
EXPORTED_SUFFIXES = (".onnx", ".pt", ".torchscript")


class ExportedScorer:
    """An `ExportedModel` as the predict loop's `ImageScorer`: images resized with the runtime's
    `resize` (PIL bicubic, as the in-process preprocessing), the calibration read from its metadata.

    Args:
        model: the loaded exported file.
        name: how errors name it (default: its path).

    Raises:
        ModelFileError: the metadata's calibration is malformed.
    """

    def __init__(self, model: ExportedModel, name: str | Path | None = None):
        self.model = model
        self.image_size = model.image_size
        try:
            self.calibration = None if model.calibration is None else Calibration.from_dict(model.calibration)
        except ValueError as exc:
            raise ModelFileError(f"{model.path if name is None else name}: malformed calibration in its "
                                 f"metadata ({exc})") from exc

    def score_images(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        result = self.model.score(np.stack([resize(im, self.image_size) for im in images]))
        return result.scores, result.maps


def is_exported(model: str | Path) -> bool:
    """Whether `model` names an exported file (by its suffix) rather than a .safetensors model."""
    return Path(model).suffix.lower() in EXPORTED_SUFFIXES


def predict_exported(model: str | Path, images: list[str | Path], output: str | Path = "predictions",
                     threshold: float | None = None, batch_size: int = 8) -> list[Prediction]:
    """`reb_dist.commands.predict.predict_images` for an exported file (see there for the arguments).

    The images go through the in-process loop, `reb_dist.pipelines.predict.predict`, with an
    `ExportedScorer`: read as there (`read_image`, too-small images refused), normalised scores
    and flags computed from the scores in float64 with the calibration in the metadata, so
    scores.csv is the same.

    Raises:
        DatasetError: some images could not be scored (after the others' results are written).
        ModelFileError: the exported file or its metadata cannot be used.
    """
    from reb_dist.reporting.results import write_predictions

    scorer = ExportedScorer(load_exported(model), model)
    calibration = scorer.calibration
    if threshold is not None:
        log.info(f"threshold {threshold:.6g}: given")
    elif calibration is not None:
        threshold = calibration.threshold
        log.info(f"threshold: the model's calibration, {calibration.describe()}")
        if calibration.warning():
            log.warning(calibration.warning())
    else:
        log.info("no threshold: none given and the model has no calibration, so images are not flagged")
    predictions = predict(scorer, prediction_inputs(images, output), batch_size, threshold)
    write_predictions(predictions, Path(output), threshold, calibration)
    failed = [p for p in predictions if p.error is not None]
    if failed:
        others = "".join(f"\n{p.path}: {p.error}" for p in failed[1:])
        raise DatasetError(failed[0].path, f"{failed[0].error}{others}\n{len(predictions) - len(failed)} of "
                                           f"{len(predictions)} images scored; results in {output}")
    return predictions
