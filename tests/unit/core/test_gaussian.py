"""GDE (one Gaussian per bank, Mahalanobis scores) against brute-force numpy, and as a scoring method."""

import numpy as np
import pytest

from reb_dist.config import ScoringConfig
from reb_dist.core.detector import BankPlan
from reb_dist.detectors import detector_scoring
from reb_dist.core import detector as detector_module
from reb_dist.core.ldknn import BankIndex, BankScorer, ScoringMethod, parse_method
from reb_dist.core.ldknn.gaussian import GaussianDensity
from reb_dist.core.ldknn.torch_search import TorchIndex

EPS = 0.01


@pytest.fixture
def bank_and_queries():
    rng = np.random.default_rng(0)
    # correlated, unequal-variance dims on a large common offset: a covariance that is far from
    # eps * I and a mean that a naive sum-of-squares covariance would cancel in float32
    mixing = rng.normal(0, 1, (8, 8)) * np.linspace(0.2, 3, 8)
    bank = (rng.normal(0, 1, (300, 8)) @ mixing + 50).astype(np.float32)
    queries = (rng.normal(0, 1.5, (60, 8)) @ mixing + 50).astype(np.float32)
    return bank, queries


def brute_force_mahalanobis2(bank, queries, eps=EPS):
    b = bank.astype(np.float64)
    precision = np.linalg.inv(np.cov(b, rowvar=False) + eps * np.eye(b.shape[1]))
    diff = queries.astype(np.float64) - b.mean(axis=0)
    return np.array([v @ precision @ v for v in diff])


@pytest.mark.parametrize("squared", [True, False])
def test_scores_match_brute_force_mahalanobis(bank_and_queries, squared):
    bank, queries = bank_and_queries
    expected = brute_force_mahalanobis2(bank, queries)
    expected = expected if squared else np.sqrt(expected)
    gde = GaussianDensity.fit(bank, eps=EPS)
    got = gde.score(queries, squared=squared)
    assert got.dtype == np.float32 and got.shape == (len(queries),)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_allclose(gde.mean, bank.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(gde.covariance, np.cov(bank.astype(np.float64), rowvar=False),
                               rtol=1e-8, atol=1e-8)


def test_eps_is_the_regularisation_and_changes_the_scores(bank_and_queries):
    bank, queries = bank_and_queries
    got = GaussianDensity.fit(bank, eps=1.0).score(queries)
    np.testing.assert_allclose(got, brute_force_mahalanobis2(bank, queries, eps=1.0), rtol=1e-4)
    assert not np.allclose(got, GaussianDensity.fit(bank, eps=EPS).score(queries), rtol=1e-3)


@pytest.mark.parametrize("fit_chunk,score_chunk", [(7, 5), (1, 1), (299, 59), (100, 60)])
def test_chunking_gives_the_same_result_as_one_chunk(bank_and_queries, fit_chunk, score_chunk):
    bank, queries = bank_and_queries
    whole = GaussianDensity.fit(bank, chunk=len(bank))
    chunked = GaussianDensity.fit(bank, chunk=fit_chunk)
    np.testing.assert_allclose(chunked.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(chunked.covariance, whole.covariance, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(chunked.score(queries, chunk=score_chunk),
                               whole.score(queries, chunk=len(queries)), rtol=1e-6)


@pytest.mark.parametrize("make_index", [BankIndex, lambda b: TorchIndex(b, device="cpu")],
                         ids=["faiss", "torch"])
def test_parse_method_gde_scores_through_the_bank_scorer(bank_and_queries, make_index):
    bank, queries = bank_and_queries
    gde, knn = parse_method("gde"), parse_method("knn", k=5)
    assert gde.label == "gde" and not gde.needs_search and knn.needs_search
    scorer = BankScorer(make_index(bank))
    scores = scorer.score([gde, knn], queries)
    np.testing.assert_allclose(scores[gde], brute_force_mahalanobis2(bank, queries), rtol=1e-4)
    plain = scorer.score([parse_method("gde", squared=False)], queries)
    np.testing.assert_allclose(next(iter(plain.values())), np.sqrt(scores[gde]), rtol=1e-6)
    assert scorer.gaussian() is scorer.gaussian()  # fitted once per scorer, then cached


class CountingIndex(BankIndex):
    """A BankIndex that counts test-patch searches."""

    searches = 0

    def search(self, *args, **kwargs):
        type(self).searches += 1
        return super().search(*args, **kwargs)


def test_gde_alone_needs_no_neighbour_search(bank_and_queries):
    bank, queries = bank_and_queries
    CountingIndex.searches = 0
    scorer = BankScorer(CountingIndex(bank))
    scorer.score([parse_method("gde")], queries)
    assert CountingIndex.searches == 0
    scorer.score([parse_method("gde"), parse_method("nn1")], queries)
    assert CountingIndex.searches == 1


def test_detector_score_features_skips_the_search_for_gde_alone(bank_and_queries):
    bank, queries = bank_and_queries
    # a detector without a backbone: score_features reads only the bank, scorer and settings
    det = object.__new__(detector_module.Detector)
    det.plan, det.scoring = BankPlan(), detector_scoring(ScoringConfig())
    det.timings, det.query_recall = detector_module.Timings(), {}
    det.bank, det.scorer = bank, BankScorer(CountingIndex(bank))
    features = queries.reshape(3, 4, 5, 8)
    CountingIndex.searches = 0
    out = det.score_features(features, [parse_method("gde")])
    assert CountingIndex.searches == 0 and "search" not in det.timings.seconds
    np.testing.assert_allclose(out[parse_method("gde")].patch_maps.ravel(),
                               brute_force_mahalanobis2(bank, queries), rtol=1e-4)
    both = det.score_features(features, [parse_method("gde"), parse_method("knn", k=3)])
    assert CountingIndex.searches == 1
    np.testing.assert_array_equal(both[parse_method("gde")].patch_maps, out[parse_method("gde")].patch_maps)


def test_an_anomalous_query_scores_higher_than_bank_points(bank_and_queries):
    bank, _ = bank_and_queries
    gde = GaussianDensity.fit(bank)
    far = bank.mean(0) + 20 * bank.std(0)
    inside = gde.score(bank)
    assert gde.score(far[None])[0] > inside.max()
    # the Mahalanobis metric, not L2: a step along the bank's widest direction costs less than the
    # same L2 step along its narrowest
    eigval, eigvec = np.linalg.eigh(np.cov(bank.astype(np.float64), rowvar=False))
    step = 3 * np.sqrt(eigval[-1])
    wide, narrow = bank.mean(0) + step * eigvec[:, -1], bank.mean(0) + step * eigvec[:, 0]
    assert gde.score(narrow[None].astype(np.float32))[0] > 10 * gde.score(wide[None].astype(np.float32))[0]


def test_gde_without_queries_raises(bank_and_queries):
    bank, queries = bank_and_queries
    scorer = BankScorer(BankIndex(bank))
    empty = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    with pytest.raises(ValueError, match="gde"):
        scorer.score_neighbours(ScoringMethod("gde"), *empty)
    assert scorer.score_neighbours(ScoringMethod("gde"), *empty, queries=queries).shape == (len(queries),)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        GaussianDensity.fit(np.empty((0, 4), np.float32))
    with pytest.raises(ValueError, match="dims"):
        GaussianDensity.fit(np.ones((5, 4), np.float32)).score(np.ones((2, 3), np.float32))
    one = GaussianDensity.fit(np.ones((1, 4), np.float32), eps=0.5)  # one point: only eps * I is left
    np.testing.assert_allclose(one.score(np.full((1, 4), 2, np.float32)), [4 / 0.5], rtol=1e-6)
