"""Calibration: F1 and quantile thresholds, normalisation around the threshold, flag metrics, round trip."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from reb_dist.core.thresholds import Calibration, calibrate, normalise, threshold_counts, threshold_metrics

# Hand-made: 5 normals, 3 anomalies, one normal (0.6) scoring above an anomaly (0.5).
LABELS = np.array([0, 0, 0, 0, 1, 0, 1, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])


def _hand_f1(t: float) -> float:
    tp = sum(1 for y, s in zip(LABELS, SCORES) if y == 1 and s >= t)
    fp = sum(1 for y, s in zip(LABELS, SCORES) if y == 0 and s >= t)
    fn = sum(1 for y, s in zip(LABELS, SCORES) if y == 1 and s < t)
    return 2 * tp / (2 * tp + fp + fn)


def test_f1_threshold_is_a_score_with_the_best_f1():
    cal = calibrate(LABELS, SCORES, "f1", source="hand")
    assert cal.threshold in SCORES
    assert _hand_f1(cal.threshold) == pytest.approx(max(_hand_f1(t) for t in SCORES))
    # at 0.5: tp 3, fp 1 (0.6), fn 0 -> 6/7, better than 0.7 (4/5) or 0.4 (6/8)
    assert cal.threshold == 0.5
    assert (cal.method, cal.low, cal.high, cal.source, cal.quantile) == ("f1", 0.1, 0.8, "hand", None)


def test_f1_needs_both_classes():
    with pytest.raises(ValueError, match="one class"):
        calibrate([0, 0, 0], [0.1, 0.2, 0.3], "f1")


def test_quantile_threshold_is_the_quantile_of_normals_only():
    rng = np.random.default_rng(0)
    normals, anomalies = rng.normal(0, 1, 50), rng.normal(3, 1, 20)
    labels = np.r_[np.zeros(50), np.ones(20)].astype(int)
    cal = calibrate(labels, np.r_[normals, anomalies], "quantile", quantile=0.9)
    assert cal.threshold == pytest.approx(np.quantile(normals, 0.9))
    assert (cal.method, cal.quantile) == ("quantile", 0.9)
    assert cal.low == min(normals.min(), anomalies.min()) and cal.high == max(normals.max(), anomalies.max())
    # anomalies do not move the threshold, and normals alone are enough
    other = calibrate(labels, np.r_[normals, anomalies + 10], "quantile", quantile=0.9)
    assert other.threshold == cal.threshold
    only = calibrate(np.zeros(50, int), normals, "quantile", quantile=0.9)
    assert only.threshold == cal.threshold
    with pytest.raises(ValueError, match="normal"):
        calibrate(np.ones(3, int), [1.0, 2.0, 3.0], "quantile")
    with pytest.raises(ValueError, match="quantile"):
        calibrate(labels, np.r_[normals, anomalies], "quantile", quantile=1.5)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="f1.*quantile"):
        calibrate(LABELS, SCORES, "otsu")
    with pytest.raises(ValueError, match="f1.*quantile"):
        Calibration(threshold=1.0, method="otsu", low=0.0, high=2.0)


def test_normalise_maps_threshold_to_half_and_the_range_to_0_1_clipped():
    cal = Calibration(threshold=2.0, method="f1", low=1.0, high=5.0)
    np.testing.assert_allclose(normalise([1.0, 1.5, 2.0, 3.5, 5.0], cal), [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(normalise([-10.0, 0.0, 6.0, 1e9], cal), [0.0, 0.0, 1.0, 1.0])
    # any shape (a pixel map stack), float output
    maps = np.full((2, 3, 4), 3.5, np.float32)
    out = normalise(maps, cal)
    assert out.shape == (2, 3, 4) and out.dtype == np.float64 and np.all(out == 0.75)
    assert normalise(np.float32(2.0), cal).shape == ()
    # >= 0.5 exactly when >= threshold, even a hair below it
    just_below = np.nextafter(2.0, 0.0)
    assert normalise(just_below, cal) < 0.5 <= normalise(2.0, cal)


def test_normalise_with_a_zero_width_side():
    at_low = Calibration(threshold=1.0, method="f1", low=1.0, high=3.0)
    np.testing.assert_array_equal(normalise([0.5, 1.0, 2.0, 3.0], at_low), [0.0, 0.5, 0.75, 1.0])
    at_high = Calibration(threshold=3.0, method="f1", low=1.0, high=3.0)
    np.testing.assert_array_equal(normalise([1.0, 2.0, 3.0, 4.0], at_high), [0.0, 0.25, 0.5, 1.0])


def test_threshold_metrics_against_a_hand_count():
    m = threshold_metrics(LABELS, SCORES, 0.5)  # flagged 0.5 0.6 0.7 0.8: tp 3, fp 1 (of 5 normals), fn 0
    assert m == pytest.approx({"precision": 3 / 4, "recall": 1.0, "f1": 6 / 7, "fpr": 1 / 5})
    m = threshold_metrics(LABELS, SCORES, 0.65)  # flagged 0.7 0.8: tp 2, fp 0, fn 1
    assert m == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 4 / 5, "fpr": 0.0})
    assert threshold_counts(LABELS, SCORES, 0.5) == {"tp": 3, "fp": 1, "fn": 0, "tn": 4}
    assert threshold_counts(LABELS, SCORES, 0.65) == {"tp": 2, "fp": 0, "fn": 1, "tn": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined values are 0.0, silently
        assert threshold_metrics(LABELS, SCORES, 0.9) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "fpr": 0.0}
        assert threshold_metrics([0, 0], [0.1, 0.2], 0.15) == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                                "fpr": 0.5}
        assert threshold_metrics([1, 1], [0.1, 0.2], 0.15)["fpr"] == 0.0


def test_to_dict_from_dict_round_trip():
    for cal in (calibrate(LABELS, SCORES, "f1", source="synthetic validation: 5 normal, 3 anomalous"),
                calibrate(LABELS, SCORES, "quantile", quantile=0.95, source="x")):
        values = json.loads(json.dumps(cal.to_dict()))
        assert Calibration.from_dict(values) == cal
        assert set(values) == {"threshold", "method", "low", "high", "source", "quantile", "normals", "anomalies",
                               "normal_fpr", "fpr_interval", "reason", "f1"}
    # a model saved before the counts and rates were recorded still loads, with them unknown
    old = Calibration.from_dict({"threshold": 0.5, "method": "f1", "low": 0.1, "high": 0.8, "source": "x",
                                 "quantile": None})
    assert (old.normals, old.normal_fpr, old.fpr_interval, old.warning()) == (0, None, None, None)


@pytest.mark.parametrize("values, match", [
    ({"method": "f1", "low": 0.0, "high": 1.0}, "threshold"),
    ({"threshold": 0.5, "method": "f1", "low": 0.0, "high": 1.0, "colour": 1}, "colour"),
    ({"threshold": "high", "method": "f1", "low": 0.0, "high": 1.0}, "threshold"),
    ({"threshold": 2.0, "method": "f1", "low": 0.0, "high": 1.0}, "low <= threshold <= high"),
    ({"threshold": 0.5, "method": "quantile", "low": 0.0, "high": 1.0}, "quantile"),
    ({"threshold": 0.5, "method": "bogus", "low": 0.0, "high": 1.0}, "f1, quantile"),
    ([0.5, "f1"], "dict"),
    ({"threshold": 0.5, "method": "f1", "low": 0.0, "high": 1.0, "normals": -1}, "normals"),
    ({"threshold": 0.5, "method": "f1", "low": 0.0, "high": 1.0, "normal_fpr": 1.5}, r"\[0, 1\]"),
    ({"threshold": 0.5, "method": "f1", "low": 0.0, "high": 1.0, "fpr_interval": [0.1]}, "fpr_interval"),
])
def test_from_dict_rejects_bad_values_clearly(values, match):
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict(values)


def test_a_calibration_says_how_many_images_set_it_and_its_false_positive_rate_with_an_interval():
    cal = calibrate(LABELS, SCORES, "f1")  # 0.5: flags 1 (0.6) of the 5 normals
    assert (cal.normals, cal.anomalies, cal.normal_fpr) == (5, 3, pytest.approx(1 / 5))
    assert cal.f1 == pytest.approx(6 / 7)
    # exact Clopper-Pearson 95% interval of 1 in 5: (0.00505, 0.71642), from the beta quantiles
    assert cal.fpr_interval == pytest.approx((0.0050508, 0.7164179), abs=1e-6)
    assert "5 normal and 3 anomalous" in cal.describe() and "20.0%" in cal.describe()
    assert cal.metrics()["threshold_normal_fpr_high"] == pytest.approx(0.7164179, abs=1e-6)
    # 5 normals are too few to trust: the warning names the count and the interval
    assert "only 5 normal images" in cal.warning() and "1-72%" in cal.warning()
    many = calibrate(np.r_[np.zeros(40, int), np.ones(5, int)], np.r_[np.linspace(0, 1, 40), [0.5] * 5], "f1")
    assert many.normals == 40 and many.warning() is None
    # none of 40 flagged is still a rate up to 8.8% at 95% (the rule of three: about 3/40)
    none = calibrate(np.zeros(40, int), np.linspace(0, 1, 40), "quantile", quantile=1.0)
    assert none.normal_fpr == pytest.approx(1 / 40) and none.fpr_interval[0] > 0


def test_auto_takes_the_normals_quantile_when_every_anomaly_is_easier_than_every_normal():
    normals = np.linspace(0.0, 1.0, 100)
    labels, scores = np.r_[np.zeros(100, int), np.ones(5, int)], np.r_[normals, [5.0, 6, 7, 8, 9]]
    easy = calibrate(labels, scores, "auto")
    # best F1 would be 5.0, the easiest anomaly's edge, far above every normal
    assert calibrate(labels, scores, "f1").threshold == 5.0
    assert (easy.method, easy.quantile) == ("quantile", 0.99) and easy.threshold == pytest.approx(np.quantile(normals, 0.99))
    assert "above every normal" in easy.reason and "auto" in easy.describe()
    # 99 normals cannot estimate a 0.99 quantile (it would be their maximum): best F1 then
    few = calibrate(labels[1:], scores[1:], "auto")
    assert few.method == "f1" and few.threshold == 5.0 and "99 normals are too few" in few.reason
    assert calibrate(labels[50:], scores[50:], "auto", quantile=0.98).method == "quantile"  # 50 >= 1 / 0.02
    overlapping = calibrate(LABELS, SCORES, "auto")
    assert overlapping.method == "f1" and overlapping.threshold == 0.5 and "overlap" in overlapping.reason
    only_normals = calibrate(np.zeros(30, int), normals[:30], "auto")
    assert only_normals.method == "quantile" and only_normals.f1 is None
