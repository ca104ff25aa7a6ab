"""`reb predict`: new images scored with a saved model; overlays and scores.csv written."""

from __future__ import annotations

import logging
from contextlib import closing
from pathlib import Path

from reb_dist.errors import DatasetError
from reb_dist.export.predict import is_exported, predict_exported
from reb_dist.io.model_file import load_model
from reb_dist.pipelines.predict import check_output_folder, predict, prediction_inputs
from reb_dist.reporting.results import write_predictions
from reb_dist.results import Prediction

log = logging.getLogger(__name__)


def predict_images(model: str | Path, images: list[str | Path], output: str | Path = "predictions",
                   threshold: float | None = None, device: str | None = None,
                   batch_size: int = 16) -> list[Prediction]:
    """Score image files (and folders of them) with a saved model; overlays and scores.csv in `output`.

    Args:
        model: a model file from `fit`, or a file `reb export` wrote (.onnx, .pt: scored by its
            runtime, `reb_dist.export.predict`; `device` does not apply).
        images: image files or folders.
        output: the folder for `<stem>_heatmap.png` overlays (made unique where stems repeat, see
            `write_predictions`) and scores.csv.
        threshold: flag images whose score is at least this (an `anomalous` column); None: the
            model's saved (calibrated) threshold, if it has one, else no flags.
        device: where features are computed (default: the model's).
        batch_size: images per feature batch.

    Raises:
        DatasetError: some images could not be scored (unreadable, too small, ...): raised after the
            others' overlays and scores.csv (with an error column) are written, naming each bad image
            with its problem.
    """
    check_output_folder(output)  # before the model loads: a bad --output costs nothing
    if is_exported(model):
        return predict_exported(model, images, output, threshold, min(batch_size, 8))
    with closing(load_model(model, device)) as detector:
        paths = prediction_inputs(images, output)
        calibration = detector.calibration
        if threshold is not None:
            log.info(f"threshold {threshold:.6g}: given")
        elif calibration is not None:
            log.info(f"threshold: the model's calibration, {calibration.describe()}")
            if calibration.warning():
                log.warning(calibration.warning())
        else:
            log.info("no threshold: none given and the model has no calibration, so images are not flagged")
        predictions = predict(detector, paths, batch_size, threshold)
    write_predictions(predictions, Path(output), threshold, calibration)
    failed = [p for p in predictions if p.error is not None]
    if failed:  # a non-zero exit, though the good images' results are written
        others = "".join(f"\n{p.path}: {p.error}" for p in failed[1:])
        raise DatasetError(failed[0].path, f"{failed[0].error}{others}\n{len(predictions) - len(failed)} of "
                                           f"{len(predictions)} images scored; overlays and scores.csv "
                                           f"(with an error column) in {output}")
    return predictions
