"""`reb fit --calibrate`: a threshold from held-out normals and DefectMaker anomalies, none of them in
the bank, saved in the model; `reb predict` then flags images by it without --threshold."""

from __future__ import annotations

import csv

import numpy as np

from reb_dist.cli import main
from reb_dist.config import SAMPLE_DATA
from reb_dist.io.model_file import load_model


def test_fit_calibrate_saves_a_validation_threshold_that_predict_uses(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    common = ["--set", "tracking.enabled=false", "--set", "backbone.device=cpu", "--categories", "bottle"]
    assert main(["fit", "--calibrate", "-o", "bottle.safetensors", *common]) == 0
    model = load_model("bottle.safetensors")
    c = model.calibration
    assert c is not None and c.method in ("f1", "quantile") and "4 normal, 4 anomalous" in c.source
    # it says how few images set it, and how uncertain its false-positive rate is
    assert (c.normals, c.anomalies) == (4, 4) and c.fpr_interval[1] - c.fpr_interval[0] > 0.5
    assert "calibrated on only 4 normal images" in caplog.text
    # the 4 held-out images (of 16) are not in the bank: 12 images' patches
    plain = tmp_path / "plain.safetensors"
    assert main(["fit", "-o", str(plain), *common]) == 0
    assert len(model.bank) * 16 == len(load_model(plain).bank) * 12
    assert load_model(plain).calibration is None

    test_dir = SAMPLE_DATA / "bottle" / "test"
    assert main(["predict", "-m", "bottle.safetensors", str(test_dir), "-o", "pred"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert len(rows) == 15
    scores = np.array([float(r["score"]) for r in rows])
    flags = np.array([r["anomalous"] in ("1", "True", "true") for r in rows])
    np.testing.assert_array_equal(flags, scores >= c.threshold)
    assert 0 < flags.sum() < 15  # the threshold separates something on the real test images
