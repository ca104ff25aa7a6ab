"""The faithful mode's last step: each image's hottest patches scored again exactly, so its image
score is the exact path's (an approximate search moved it before)."""

from __future__ import annotations

import numpy as np
import pytest

from reb_dist.config import RunConfig
from reb_dist.core.detector import Detector
from reb_dist.core.ldknn import BankIndex, BankScorer, parse_method
from reb_dist.core.ldknn.refine import hottest_patches, refine_methods, refine_top_patches
from reb_dist.detectors import bank_plan

from tests.conftest import BOTTLE

# IVF with two lists probed (recall@K ~0.92-0.96 on the sample): image scores move, so refinement has work to do
ROUGH = ["bank.neighbour_search=ivf", "bank.query_search=ivf", "bank.nprobe=2"]


def _detector(detector, *settings: str) -> Detector:
    d = Detector(detector.backbone, detector.scoring, 256, device="cpu",
                 bank=bank_plan(RunConfig.load(None, BOTTLE + list(settings)).bank))
    d.set_bank(detector.bank)
    return d


def test_hottest_patches_are_each_rows_largest():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [3.0, 1.0, 2.0, 0.0]])
    assert [sorted(r) for r in hottest_patches(scores, 2).tolist()] == [[1, 3], [0, 2]]
    assert hottest_patches(scores, 10).shape == (2, 4)  # capped at the patches there are


@pytest.mark.parametrize("spec", ["ldknn", "ldknn:k=5,alpha=0.5", "knn:k=4", "nn1"])
def test_refining_every_patch_gives_the_exact_paths_scores(bank_and_queries, spec):
    bank, queries = bank_and_queries
    method = parse_method(spec)
    rough = BankIndex(bank, neighbour_search="ivf", query_search="ivf", nprobe=1)
    approx = BankScorer(rough).score([method], queries)[method].reshape(7, 100)
    exact = BankScorer(BankIndex(bank, neighbour_search="exact")).score([method], queries)[method].reshape(7, 100)
    assert not np.allclose(approx, exact)  # the rough index really moved scores
    refined, changed = refine_top_patches(rough, method, queries.reshape(7, 100, -1), approx, 100)
    np.testing.assert_array_equal(refined, exact)
    assert changed == int((~np.isclose(approx, exact, rtol=1e-5, atol=1e-6)).sum())


def test_methods_share_one_exact_search_and_one_density_search(bank_and_queries):
    """A benchmark's methods are refined together: one exact search of the union of their hottest
    patches and one of those patches' nearest points' neighbours (the largest K), not two per method."""
    bank, queries = bank_and_queries
    methods = [parse_method(s) for s in ("ldknn", "ldknn:k=5,alpha=0.5", "ldknn:k=20,alpha=2", "knn:k=4", "nn1")]
    rough = BankIndex(bank, neighbour_search="ivf", query_search="ivf", nprobe=1)
    approx = BankScorer(rough).score(methods, queries)
    maps = [approx[m].reshape(7, 100) for m in methods]
    alone = [refine_top_patches(rough, m, queries.reshape(7, 100, -1), s, 8) for m, s in zip(methods, maps)]
    exact_searches = []
    search = rough.search
    rough.search = lambda q, k, **kw: exact_searches.append((len(q), k)) or search(q, k, **kw)
    together = refine_methods(rough, methods, queries.reshape(7, 100, -1), maps, 8)
    assert [k for _, k in exact_searches] == [4, 21]  # knn's 4 nearest; K 20's neighbours plus self
    assert exact_searches[0][0] < sum(min(8, 100) * 7 for _ in methods)  # hottest patches shared, searched once
    for m, (scores, changed), (want, want_changed) in zip(methods, together, alone):
        np.testing.assert_array_equal(scores, want, err_msg=m.label)
        assert changed == want_changed, m.label


def test_gde_is_not_refined(bank_and_queries):
    bank, queries = bank_and_queries
    with pytest.raises(ValueError, match="gde: only ldknn, knn, nn1, kthnn"):
        refine_top_patches(BankIndex(bank), parse_method("gde"), queries.reshape(7, 100, -1), np.zeros((7, 100)))


def test_a_faithful_detectors_image_scores_are_the_exact_paths(detector, test_features):
    methods = [parse_method("ldknn"), parse_method("ldknn:k=20,alpha=2"), parse_method("knn:k=5")]
    exact = _detector(detector, "preset=exact").score_features(test_features, methods)
    unrefined = _detector(detector, *ROUGH, "bank.refine_top=0").score_features(test_features, methods)
    faithful = _detector(detector, *ROUGH)  # refine_top: its default
    refined = faithful.score_features(test_features, methods)
    for m in methods:
        assert not np.allclose(unrefined[m].image_scores, exact[m].image_scores), m.label  # what was fixed
        np.testing.assert_array_equal(refined[m].image_scores, exact[m].image_scores, err_msg=m.label)
        assert faithful.refined_changed[m.label] > 0
    assert faithful.timings.seconds["refine"] > 0


def test_an_exact_detector_refines_nothing(detector, test_features):
    exact = _detector(detector, "preset=exact")
    exact.score_features(test_features, [parse_method("ldknn")])
    assert exact.refined_changed == {} and "refine" not in exact.timings.seconds


def test_a_refined_tables_image_scores_are_the_exact_tables_at_every_setting(bank_and_queries):
    from reb_dist.core.ldknn.refine import corner_settings, refine_table
    from reb_dist.core.ldknn.selection import ldknn_maps, neighbour_table

    bank, queries = bank_and_queries
    features = queries.reshape(7, 10, 10, -1)
    rough = BankIndex(bank, neighbour_search="ivf", query_search="ivf", nprobe=2)
    table = neighbour_table(rough, features, 16, query_k=3)
    exact = neighbour_table(BankIndex(bank, neighbour_search="exact"), features, 16, query_k=3)
    corners = corner_settings(1, 16, 0.0, 2.0)
    assert corners[0] == (1, 0.0) and corners[-1] == (16, 2.0) and len(corners) == 9
    refined, changed = refine_table(rough, features, table, corners)
    assert changed > 0
    moved = 0
    for k, alpha in corners + [(5, 0.7), (11, 1.3)]:  # the corners and two settings inside the box
        want = ldknn_maps(exact, k, alpha).reshape(7, -1).max(1)
        moved += not np.allclose(ldknn_maps(table, k, alpha).reshape(7, -1).max(1), want, rtol=1e-6)
        np.testing.assert_allclose(ldknn_maps(refined, k, alpha).reshape(7, -1).max(1), want, rtol=1e-6)
    assert moved > 0  # the unrefined table's image scores were not the exact ones
    np.testing.assert_array_equal(ldknn_maps(table, 9, 1.0), ldknn_maps(neighbour_table(rough, features, 16), 9, 1.0))
    # patches an earlier call refined are not searched again
    done = np.zeros(700, bool)
    once, changed = refine_table(rough, features, table, [(16, 2.0)], refined=done)
    assert changed > 0 and 0 < done.sum() <= 7 * 8
    again, changed = refine_table(rough, features, once, [(16, 2.0)], refined=done)
    assert again is once and changed == 0
