"""`reb fit` logs its model as a pyfunc MLflow model: loaded back through MLflow it scores as the
Detector does, and it is registered when tracking.register_model names it (real sqlite store)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from reb_dist.cli import main
from reb_dist.config import SAMPLE_DATA
from reb_dist.io.model_file import load_model
from reb_dist.pipelines.predict import predict

IMAGES = [SAMPLE_DATA / "bottle" / "test" / name for name in ("good/000.png", "broken_large/000.png",
                                                              "contamination/010.png")]


def test_fit_logs_a_pyfunc_model_that_scores_as_the_detector(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["fit", "--calibrate", "--categories", "bottle", "-o", "bottle.safetensors", "--set", "data.few_shot=6",
                 "--set", "scoring.methods=[ldknn]", "--set", "cache.enabled=false", "--set", f"tracking.uri={uri}",
                 "--set", "tracking.register_model=reb-{category}"]) == 0
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id],
                                "tags.command = 'fit'")

    logged = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/bottle")
    # a model from code: the wrapper's source is logged, no pickled object, so loading never unpickles
    logged_files = [Path(a).name for a in _all_files(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/bottle"))]
    assert "mlflow_pyfunc.py" in logged_files and not [f for f in logged_files if f.endswith(".pkl")]
    schema = logged.metadata.signature
    assert schema.inputs.input_names() == ["image"]
    assert schema.outputs.input_names() == ["score", "normalised_score", "anomalous", "anomaly_map"]
    out = logged.predict(pd.DataFrame({"image": [str(p) for p in IMAGES]}))

    detector = load_model("bottle.safetensors")
    expected = predict(detector, IMAGES)
    np.testing.assert_allclose(out["score"], [p.score for p in expected], rtol=1e-6)
    np.testing.assert_allclose(out["anomaly_map"], np.stack([p.pixel_map for p in expected]), rtol=1e-5, atol=1e-5)
    assert list(out["anomalous"]) == [p.score >= detector.calibration.threshold for p in expected]
    assert list(out["anomalous"]) == [False, True, True]  # a good bottle and two defects, at the calibrated threshold
    np.testing.assert_allclose(out["normalised_score"], [p.normalised_score for p in expected])

    # an input example a user can copy: one of the model's own training images, in the input's format
    folder = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/bottle")
    example = mlflow.models.Model.load(folder).load_input_example(folder)
    assert list(example) == ["image"] and example["image"][0] in detector.train_images

    # the fit's metrics: bank size, timings and the threshold with how far it can be trusted
    child = [r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("mlflow.parentRunId")
             == run.info.run_id][0].data.metrics
    assert child["bank_size"] == len(detector.bank) and child["threshold"] == detector.calibration.threshold
    assert {"threshold_normals", "threshold_normal_fpr", "threshold_normal_fpr_high", "seconds/features"} <= set(child)

    (version,) = client.search_model_versions("name = 'reb-bottle'")  # registered, as the settings ask
    assert version.run_id == run.info.run_id
    assert mlflow.models.get_model_info("models:/reb-bottle/1").signature == schema



def _all_files(folder: str) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.is_file()]


def test_a_model_file_replaced_after_the_fit_wrote_it_is_not_logged_as_the_fits(tmp_path):
    import pytest

    from reb_dist.errors import ModelFileError
    from reb_dist.io.feature_cache import file_sha256
    from reb_dist.io.mlflow_model import log_model

    model = tmp_path / "bottle.safetensors"
    model.write_bytes(b"the model this fit wrote")
    written = file_sha256(model)
    model.write_bytes(b"another fit's model, written to the same path meanwhile")
    with pytest.raises(ModelFileError, match="was replaced after this fit wrote it"):
        log_model(model, "bottle", sha256=written)  # before: logged whatever the path held by then
