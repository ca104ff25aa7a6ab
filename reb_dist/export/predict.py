"""`reb predict` with an exported file: the same predictions, overlays and scores.csv as with a
.safetensors model, scored by `reb_dist.export.runtime` instead of a `Detector`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from reb_dist.core.thresholds import Calibration, normalise
from reb_dist.errors import DatasetError, ModelFileError
from reb_dist.export.runtime import load_exported, resize
from reb_dist.io.data.images import check_image_side, read_image
from reb_dist.pipelines.predict import Prediction, find_images

log = logging.getLogger(__name__)
EXPORTED_SUFFIXES = (".onnx", ".pt", ".torchscript")


def is_exported(model: str | Path) -> bool:
    """Whether `model` names an exported file (by its suffix) rather than a .safetensors model."""
    return Path(model).suffix.lower() in EXPORTED_SUFFIXES


def predict_exported(model: str | Path, images: list[str | Path], output: str | Path = "predictions",
                     threshold: float | None = None, batch_size: int = 8) -> list[Prediction]:
    """`reb_dist.pipelines.runs.predict_images` for an exported file (see there for the arguments).

    Images are read as the in-process path reads them (`read_image`, too-small images refused);
    normalised scores and flags are computed from the scores in float64 with the calibration in
    the metadata, as `reb_dist.pipelines.predict.predict` does, so scores.csv is the same.

    Raises:
        DatasetError: some images could not be scored (after the others' results are written).
        ModelFileError: the exported file or its metadata cannot be used.
    """
    from reb_dist.reporting.results import write_predictions

    exported = load_exported(model)
    try:
        calibration = None if exported.calibration is None else Calibration.from_dict(exported.calibration)
    except ValueError as exc:
        raise ModelFileError(f"{model}: malformed calibration in its metadata ({exc})") from exc
    if threshold is not None:
        log.info(f"threshold {threshold:.6g}: given")
    elif calibration is not None:
        threshold = calibration.threshold
        log.info(f"threshold {threshold:.6g}: the model's calibration ({calibration.method})")
    else:
        log.info("no threshold: none given and the model has no calibration, so images are not flagged")
    paths = find_images(images)
    predictions = []
    for start in range(0, len(paths), batch_size):
        chunk, read = paths[start:start + batch_size], {}
        done: dict[int, Prediction] = {}
        for i, p in enumerate(chunk):
            try:
                read[i] = read_image(p)
                check_image_side(p, read[i].shape[1::-1], exported.image_size)
            except DatasetError as exc:  # one bad file must not cost the others their scores
                read.pop(i, None)
                done[i] = Prediction(p, None, float("nan"), None, error=exc.problem)
        if read:
            result = exported.score(np.stack([resize(im, exported.image_size) for im in read.values()]))
            for (i, image), score, pixel_map in zip(read.items(), result.scores, result.maps):
                score = float(score)
                normalised = None if calibration is None else float(normalise(score, calibration))
                flagged = None if threshold is None else score >= threshold
                done[i] = Prediction(chunk[i], image, score, pixel_map, normalised, flagged)
        predictions += [done[i] for i in range(len(chunk))]
    write_predictions(predictions, Path(output), threshold, calibration)
    failed = [p for p in predictions if p.error is not None]
    if failed:
        others = "".join(f"\n{p.path}: {p.error}" for p in failed[1:])
        raise DatasetError(failed[0].path, f"{failed[0].error}{others}\n{len(predictions) - len(failed)} of "
                                           f"{len(predictions)} images scored; results in {output}")
    return predictions
