"""Logging a fitted model as an MLflow model: the `pyfunc` wrapper in reb_dist/mlflow_pyfunc.py (a
model from code, above the Python API it scores through) with the .safetensors file as its one
artefact, an explicit signature and explicit requirements.

The wrapper is logged by its file path, never imported here: this module sits in io/, under the API.

The backbone's weights are not in the artefact (as in the model file: named and fingerprinted), so the
environment that loads it needs reb-dist with its weights packages installed; `pip_requirements` say so
explicitly, so logging never infers requirements (which imports and probes packages, and may reach the
network).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import warnings
from pathlib import Path

import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

from reb_dist.version import __version__
from reb_dist.errors import ModelFileError
from reb_dist.io.feature_cache import file_sha256
from reb_dist.io.model_file import model_metadata, training_images

IMAGE_COLUMN = "image"
MODEL_ARTIFACT = "model"  # the artefact key of the .safetensors file
# the wrapper's source, found without importing it (it imports the API, which sits above io/)
WRAPPER = importlib.util.find_spec("reb_dist.mlflow_pyfunc").origin


def signature(calibrated: bool) -> ModelSignature:
    """Input: an "image" column of paths; output: score, [normalised_score, anomalous,] anomaly_map."""
    outputs = [ColSpec("double", "score")]
    if calibrated:
        outputs += [ColSpec("double", "normalised_score"), ColSpec("boolean", "anomalous")]
    outputs.append(ColSpec(Array(Array("float")), "anomaly_map"))
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), outputs=Schema(outputs))


def pip_requirements() -> list[str]:
    """The packages a serving environment needs: reb-dist (bringing torch, faiss, the weights
    packages) and this MLflow, at the versions logging ran with."""
    return [f"reb-dist=={__version__}", f"mlflow=={mlflow.__version__}"]


def log_model(model_file: str | Path, name: str, registered_name: str | None = None, sha256: str | None = None):
    """Log a model file as a pyfunc MLflow model in the active run (registered when a name is given).

    Args:
        model_file: a .safetensors file written by `reb fit`.
        name: the logged model's name in the run (e.g. the category).
        registered_name: the model registry name to add it to as a new version; None: not registered.
        sha256: the hash of the bytes the fit wrote: the file is copied aside, the copy checked
            against it and logged, so the run holds the model this fit made even when another
            process replaces the file meanwhile (ModelFileError when it already has).

    Returns:
        MLflow's ModelInfo (`.model_uri` loads it; `.registered_model_version` when registered).
    """
    if sha256 is not None:
        with tempfile.TemporaryDirectory(prefix="reb-model-") as folder:
            copy = Path(folder) / Path(model_file).name
            shutil.copyfile(model_file, copy)
            if file_sha256(copy) != sha256:
                raise ModelFileError(f"{model_file}: was replaced after this fit wrote it (another fit to the same "
                                     "path?); the MLflow run does not log another model as this one")
            return log_model(copy, name, registered_name)
    meta = model_metadata(model_file)
    metadata = {k: meta[k] for k in ("category", "backbone_weights", "backbone_fingerprint", "image_size",
                                     "reb_dist_version", "calibration") if k in meta}
    example = input_example(meta)
    with warnings.catch_warnings():
        # a model file without recorded training images logs no example (MLflow warns of that)
        warnings.filterwarnings("ignore", message=".*An input example was not provided")  # colour code first
        return mlflow.pyfunc.log_model(
            name=name, python_model=WRAPPER, artifacts={MODEL_ARTIFACT: str(model_file)},
            signature=signature("calibration" in meta), pip_requirements=pip_requirements(),
            registered_model_name=registered_name or None, metadata=metadata, input_example=example)


def input_example(meta: dict[str, str]):
    """The pyfunc model's input example: a one-row "image" column naming one of the model's own
    training images (None when the file records none). MLflow stores it beside the model (what the
    UI and `mlflow models predict` show) and scores it once while logging, a check that the logged
    model loads and runs."""
    images = [p for p in training_images(meta) if Path(p).is_file()]
    return {IMAGE_COLUMN: images[:1]} if images else None  # MLflow makes it the signature's DataFrame
