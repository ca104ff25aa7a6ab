"""A fitted model as an MLflow model: a `pyfunc` wrapper whose one artefact is the .safetensors file.

`mlflow.pyfunc.load_model(uri).predict(images)` scores through `reb_dist.api.Model`, the same path
as `reb predict`. Input: a DataFrame with an "image" column of image file paths (what `mlflow models
predict -i images.csv -t csv` reads). Output:
columns with one entry per image: score, anomaly_map (S x S), and normalised_score and anomalous when
the model was saved with a calibrated threshold.

The backbone's weights are not in the artefact (as in the model file: named and fingerprinted), so the
environment that loads it needs reb-dist with its weights packages installed; `pip_requirements` say so
explicitly, so logging never infers requirements (which imports and probes packages, and may reach the
network).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

from reb_dist.version import __version__
from reb_dist.io.model_file import model_metadata

IMAGE_COLUMN = "image"
MODEL_ARTIFACT = "model"  # the artefact key of the .safetensors file


class RebModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: loads the model file, scores image paths with `reb_dist.api.Model`."""

    # no type-hint validation of `predict` (MLflow warns when there are no hints): the signature is
    # given explicitly (`signature`) and MLflow checks inputs against it
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from reb_dist.api import Model

        self.model = Model.load(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input, params=None):
        """Score images: a DataFrame with an "image" column of paths.

        Returns:
            A dict of columns, one entry per image: "score" (N,), "normalised_score" (N,) and
            "anomalous" (N,) when the model is calibrated, "anomaly_map" (N, S, S).
        """
        columns = list(getattr(model_input, "columns", model_input))
        if IMAGE_COLUMN not in columns:
            raise ValueError(f"expected a column {IMAGE_COLUMN!r} of image paths, got {columns}")
        paths = list(model_input[IMAGE_COLUMN])
        result = self.model.predict([str(p) for p in paths])
        columns = {"score": result.scores}
        if result.normalised_scores is not None:
            columns["normalised_score"] = result.normalised_scores
        if result.flags is not None:
            columns["anomalous"] = result.flags
        columns["anomaly_map"] = result.maps
        return columns


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


def log_model(model_file: str | Path, name: str, registered_name: str | None = None):
    """Log a model file as a pyfunc MLflow model in the active run (registered when a name is given).

    Args:
        model_file: a .safetensors file written by `reb fit`.
        name: the logged model's name in the run (e.g. the category).
        registered_name: the model registry name to add it to as a new version; None: not registered.

    Returns:
        MLflow's ModelInfo (`.model_uri` loads it; `.registered_model_version` when registered).
    """
    meta = model_metadata(model_file)
    metadata = {k: meta[k] for k in ("category", "backbone_weights", "backbone_fingerprint", "image_size",
                                     "reb_dist_version", "calibration") if k in meta}
    with warnings.catch_warnings():
        # no input example on purpose: MLflow would load the model and score it while logging
        warnings.filterwarnings("ignore", message=".*An input example was not provided")  # colour code first
        return mlflow.pyfunc.log_model(
            name=name, python_model=RebModel(), artifacts={MODEL_ARTIFACT: str(model_file)},
            signature=signature("calibration" in meta), pip_requirements=pip_requirements(),
            registered_model_name=registered_name or None, metadata=metadata)
