"""A model's saved calibration: kept by the model file, used by `reb predict` to flag images and to
draw its overlays on a fixed scale; a given threshold wins; without one nothing is flagged."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from reb_dist.core.thresholds import Calibration
from reb_dist.errors import ModelFileError
from reb_dist.io.model_file import load_model, save_model
from reb_dist.pipelines.predict import predict
from reb_dist.commands.predict import predict_images

# distinct file stems, so no overlay overwrites another
IMAGES = ["good/004.png", "good/008.png", "broken_large/019.png", "contamination/020.png"]


@pytest.fixture(scope="module")
def paths(cfg):
    return [cfg.data.resolved_root() / "bottle" / "test" / name for name in IMAGES]


@pytest.fixture(scope="module")
def scores(detector, paths):
    """The images' scores, straight from the fitted detector (no calibration)."""
    assert detector.calibration is None
    return np.array([p.score for p in predict(detector, paths)])


@pytest.fixture(scope="module")
def calibration(scores):
    """A threshold between the 2nd and 3rd highest score: exactly two images at or above it."""
    ordered = np.sort(scores)
    assert ordered[1] < ordered[2]
    return Calibration(threshold=float((ordered[1] + ordered[2]) / 2), method="quantile", low=float(ordered[0]),
                       high=float(ordered[-1]), source="test: 4 images", quantile=0.5)


def _save(detector, path, calibration):
    """Save `detector` with `calibration`, leaving the shared fixture as it was."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(detector, "calibration", calibration)
        return save_model(detector, path)


@pytest.fixture(scope="module")
def calibrated(detector, calibration, tmp_path_factory):
    return _save(detector, tmp_path_factory.mktemp("calibrated") / "m.safetensors", calibration)


@pytest.fixture(scope="module")
def plain(detector, tmp_path_factory):
    return _save(detector, tmp_path_factory.mktemp("plain") / "m.safetensors", None)


def _csv(folder):
    with open(folder / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_calibration_round_trips_through_the_model_file(calibrated, plain, calibration):
    assert load_model(calibrated, device="cpu").calibration == calibration
    assert load_model(plain, device="cpu").calibration is None  # files without one still load
    with safe_open(str(plain), framework="numpy") as f:
        assert "calibration" not in f.metadata()


@pytest.mark.parametrize("text", ["{not json", '{"threshold": 1.0}', '{"threshold": 9, "method": "f1", '
                                  '"low": 0, "high": 1}'])
def test_a_malformed_calibration_names_the_file(calibrated, tmp_path, text):
    with safe_open(str(calibrated), framework="numpy") as f:
        meta = dict(f.metadata())
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(str(calibrated)), str(broken), {**meta, "calibration": text})
    with pytest.raises(ModelFileError, match=r"broken\.safetensors.*calibration"):
        load_model(broken, device="cpu")


def test_predict_flags_the_images_at_or_above_the_saved_threshold(calibrated, calibration, paths, scores,
                                                                  tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="reb_dist")
    predictions = predict_images(calibrated, paths, tmp_path, device="cpu")
    assert f"{calibration.threshold:.6g}" in caplog.text
    expected = [bool(s >= calibration.threshold) for s in scores]
    assert sum(expected) == 2
    np.testing.assert_allclose([p.score for p in predictions], scores, rtol=1e-6)
    assert [p.anomalous for p in predictions] == expected
    assert [p.normalised_score >= 0.5 for p in predictions] == expected
    assert all(0.0 <= p.normalised_score <= 1.0 for p in predictions)

    rows = _csv(tmp_path)
    assert list(rows[0]) == ["image", "score", "normalised_score", "anomalous", "hot_patch", "nearest_train_image",
                             "nearest_train_patch", "nearest_distance"]
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    assert [r["anomalous"] for r in rows] == [str(int(e)) for e in expected]
    assert [float(r["normalised_score"]) >= 0.5 for r in rows] == expected


def test_calibrated_overlays_do_not_depend_on_the_other_images(calibrated, plain, paths, tmp_path):
    # With a calibration the colour scale is fixed (0..1 of the normalised map), so an image's overlay
    # is the same whatever else is predicted with it; without one it follows this run's min..max.
    def overlay(model, images, folder):
        predict_images(model, images, tmp_path / folder, device="cpu")
        return np.asarray(Image.open(tmp_path / folder / f"{paths[0].stem}_heatmap.png"))

    assert np.array_equal(overlay(calibrated, paths, "all"), overlay(calibrated, paths[:1], "one"))
    assert not np.array_equal(overlay(plain, paths, "all_plain"), overlay(plain, paths[:1], "one_plain"))


def test_a_given_threshold_overrides_the_saved_one(calibrated, calibration, paths, scores, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="reb_dist")
    given = float(np.min(scores))  # every image is at or above it, unlike with the saved threshold
    predictions = predict_images(calibrated, paths, tmp_path, threshold=given, device="cpu")
    assert "given" in caplog.text
    assert [p.anomalous for p in predictions] == [True] * len(paths)
    assert [r["anomalous"] for r in _csv(tmp_path)] == ["1"] * len(paths)
    # the normalised score stays on the saved scale
    assert [p.normalised_score >= 0.5 for p in predictions] == [bool(s >= calibration.threshold) for s in scores]


def test_without_calibration_nothing_is_flagged(plain, paths, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="reb_dist")
    predictions = predict_images(plain, paths, tmp_path, device="cpu")
    assert "no threshold" in caplog.text
    assert all(p.anomalous is None and p.normalised_score is None for p in predictions)
    assert list(_csv(tmp_path)[0]) == ["image", "score", "hot_patch", "nearest_train_image", "nearest_train_patch",
                                       "nearest_distance"]


def test_predict_uses_the_detector_calibration(detector, calibration, paths, scores):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(detector, "calibration", calibration)
        flagged = [p.anomalous for p in predict(detector, paths)]
        overridden = [p.anomalous for p in predict(detector, paths, threshold=np.inf)]
    assert flagged == [bool(s >= calibration.threshold) for s in scores]
    assert overridden == [False] * len(paths)
    assert detector.calibration is None  # the shared detector is as it was
