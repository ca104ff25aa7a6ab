"""The in-process detector and an exported file go through the one predict loop
(`reb_dist.pipelines.predict.predict`) behind its two adapters, and give predictions of the same
form: the same paths, images, errors, types and shapes, and scores within the export's tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reb_dist.export.predict import ExportedScorer
from reb_dist.export.runtime import load_exported
from reb_dist.io.model_file import load_model
from reb_dist.pipelines.predict import DetectorScorer, ImageScorer, predict
from tests.unit.export.conftest import skip_without_onnx

RTOL = 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_both_adapters_give_predictions_of_one_form(fmt, model_file, exported, export_paths, tmp_path):
    if fmt == "onnx":
        skip_without_onnx()
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((4, 40, 3), np.uint8)).save(tiny)
    paths = [export_paths[0], tiny, *export_paths[1:]]
    detector = load_model(model_file, "cpu")
    scorers = {"detector": DetectorScorer(detector), "exported": ExportedScorer(load_exported(exported[fmt]))}
    assert all(isinstance(s, ImageScorer) for s in scorers.values())
    assert scorers["exported"].calibration == detector.calibration is not None
    assert scorers["exported"].image_size == detector.image_size
    got = {name: predict(scorer, paths, batch_size=3) for name, scorer in scorers.items()}
    inproc, export = got["detector"], got["exported"]
    assert [p.path for p in export] == [p.path for p in inproc] == paths
    assert [p.error for p in export] == [p.error for p in inproc]
    assert "only 40x4 pixels" in inproc[1].error
    for a, b in zip(inproc, export):
        if a.error is not None:
            assert np.isnan(a.score) and np.isnan(b.score)
            assert (a.image, a.pixel_map, a.normalised_score, a.anomalous) == (None,) * 4
            assert (b.image, b.pixel_map, b.normalised_score, b.anomalous) == (None,) * 4
            continue
        np.testing.assert_array_equal(a.image, b.image)
        assert type(a.score) is type(b.score) is float
        assert type(a.normalised_score) is type(b.normalised_score) is float
        assert type(a.anomalous) is type(b.anomalous) is bool and a.anomalous == b.anomalous
        assert a.pixel_map.shape == b.pixel_map.shape and a.pixel_map.dtype == b.pixel_map.dtype == np.float32
        assert b.score == pytest.approx(a.score, rel=RTOL)
        assert b.normalised_score == pytest.approx(a.normalised_score, abs=1e-5)
    # the detector itself goes in through its adapter: the same predictions
    direct = predict(detector, paths, batch_size=3)
    assert [p.score for p in direct if p.error is None] == [p.score for p in inproc if p.error is None]
