"""Decoupled scoring: the image score from one method, the anomaly map from another, one search."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from reb_dist.core.ldknn import parse_method
from reb_dist.detectors import detector_scoring_settings, set_scoring


def test_map_method_spec_parses_and_labels():
    m = parse_method("ldknn", 40, 1.7, map_spec="knn:k=9")
    assert (m.name, m.k, m.alpha) == ("ldknn", 40, 1.7)
    assert (m.map.name, m.map.k) == ("knn", 9)
    assert m.label == "ldknn(k=40,alpha=1.7)+map:knn(k=9)"
    assert m.image.label == "ldknn(k=40,alpha=1.7)" and m.map_method.label == "knn(k=9)"
    assert m.query_neighbours == 9  # the one search serves both
    assert parse_method("ldknn", 9, 1.0, map_spec="ldknn").map is None  # the same method: coupled
    assert parse_method("knn", 9).map_method == parse_method("knn", 9)


def test_decoupled_scores_take_the_image_from_one_method_and_the_map_from_the_other(detector, test_features):
    ldknn, knn = parse_method("ldknn", 9, 1.0), parse_method("knn", 9)
    pair = dataclasses.replace(ldknn, map=knn)
    searches = []
    search = detector.scorer.index.search
    detector.scorer.index.search = lambda *a, **kw: searches.append((len(a[0]), a[1])) or search(*a, **kw)
    try:
        got = detector.score_features(test_features, [pair, ldknn, knn])
    finally:
        detector.scorer.index.search = search
    n, h, w, _ = test_features.shape
    assert [k for rows, k in searches if rows == n * h * w] == [9]  # one test search, the largest K of any part
    np.testing.assert_array_equal(got[pair].image_scores, got[ldknn].image_scores)
    np.testing.assert_array_equal(got[pair].patch_maps, got[knn].patch_maps)
    assert not np.allclose(got[ldknn].patch_maps, got[knn].patch_maps)


def test_the_configured_map_method_reaches_the_default_method(detector):
    scoring = detector_scoring_settings(detector)
    try:
        set_scoring(detector, dataclasses.replace(scoring, map_method="ldknn:k=4,alpha=0.1"))
        m = detector.default_method
        assert m.label == f"ldknn(k={scoring.k},alpha={scoring.alpha:g})+map:ldknn(k=4,alpha=0.1)"
        assert detector.methods()[0] == m and detector.methods()[1].map is None
        assert detector.map_density_k == 4
    finally:
        set_scoring(detector, scoring)
    assert detector.map_density_k is None
    with pytest.raises(ValueError, match="unknown scoring method"):
        parse_method("ldknn", map_spec="blur")


def test_a_decoupled_run_reports_the_image_metrics_of_one_method_and_the_pixel_metrics_of_the_other(
        detector, split, cfg):
    from reb_dist.pipelines.evaluate import score_test_set

    scoring = detector_scoring_settings(detector)
    try:
        set_scoring(detector, dataclasses.replace(scoring, methods=["ldknn", "knn"], map_method="knn"))
        result = score_test_set(detector, split, cfg.data)
    finally:
        set_scoring(detector, scoring)
    by_label = {m.method.label: m.metrics for m in result.methods}
    pair, knn = by_label["ldknn(k=9,alpha=1)+map:knn(k=9)"], by_label["knn(k=9)"]
    coupled = score_test_set(detector, split, cfg.data, [parse_method("ldknn", 9, 1.0)]).methods[0].metrics
    assert pair["image_auroc"] == coupled["image_auroc"] and pair["image_f1"] == coupled["image_f1"]
    assert pair["pixel_auroc"] == knn["pixel_auroc"] and pair["aupro"] == knn["aupro"]
    assert pair["aupro"] != coupled["aupro"]
