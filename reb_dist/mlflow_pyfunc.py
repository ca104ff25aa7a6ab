"""The MLflow pyfunc wrapper of a fitted model, above the Python API it scores through.

MLflow loads this file as a model from code (`reb_dist.io.mlflow_model.log_model` logs its path,
not a pickled object: loading a model never unpickles). Its one artefact is the .safetensors file;
`mlflow.pyfunc.load_model(uri).predict(images)` scores through `reb_dist.api.Model`, the same path
as `reb predict`. Input: a DataFrame with an "image" column of image file paths (what `mlflow models
predict -i images.csv -t csv` reads). Output: columns with one entry per image: score, anomaly_map
(S x S), and normalised_score and anomalous when the model was saved with a calibrated threshold.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc

from reb_dist.api import Model
from reb_dist.io.mlflow_model import IMAGE_COLUMN, MODEL_ARTIFACT


class RebModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: loads the model file, scores image paths with `reb_dist.api.Model`."""

    # no type-hint validation of `predict` (MLflow warns when there are no hints): the signature is
    # given explicitly (`signature`) and MLflow checks inputs against it
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
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


mlflow.models.set_model(RebModel())
