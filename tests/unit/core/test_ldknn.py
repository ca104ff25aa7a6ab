"""LDKNN and its KNN-family baselines against brute-force numpy on small banks."""

import numpy as np
import pytest

from reb_dist.core.ldknn import BankIndex, BankScorer, ScoringMethod, greedy_coreset, parse_method


def brute_force_distances(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)


@pytest.fixture
def bank_and_queries():
    rng = np.random.default_rng(0)
    # two clusters of very different spread: the density bias LDKNN is meant to correct
    dense = rng.normal(0, 0.1, (150, 8))
    sparse = rng.normal(3, 1.0, (150, 8))
    bank = np.vstack([dense, sparse]).astype(np.float32)
    queries = rng.normal(1.5, 1.5, (60, 8)).astype(np.float32)
    return bank, queries


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("k", [1, 5])
def test_local_density_matches_brute_force(bank_and_queries, k, squared):
    bank, _ = bank_and_queries
    d2 = brute_force_distances(bank, bank)
    np.fill_diagonal(d2, np.inf)  # self excluded by index
    d = d2 if squared else np.sqrt(d2)
    expected = np.sort(d, axis=1)[:, :k].mean(axis=1)
    got = BankScorer(BankIndex(bank)).stats.local_density(k, squared)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_self_is_excluded_even_with_duplicate_points():
    bank = np.zeros((6, 4), np.float32)
    bank[3:] = 1.0  # three copies of two points: all self-distances and twin distances are 0
    stats = BankScorer(BankIndex(bank)).stats
    dist2, ids = stats.neighbours(2, np.arange(6))
    assert not (ids == np.arange(6)[:, None]).any()
    np.testing.assert_allclose(dist2, 0.0)


def test_lazy_density_equals_full_and_computes_only_what_is_asked(bank_and_queries):
    bank, _ = bank_and_queries
    full = BankScorer(BankIndex(bank)).stats.local_density(7, True)
    stats = BankScorer(BankIndex(bank)).stats
    some = np.array([5, 200, 5, 17])
    np.testing.assert_allclose(stats.local_density(7, True, some), full[some], rtol=1e-6)
    assert np.isfinite(stats._density[(7, True)]).sum() == 3  # 3 distinct points, not 300


@pytest.mark.parametrize("squared", [True, False])
def test_scores_match_brute_force(bank_and_queries, squared):
    bank, queries = bank_and_queries
    k, alpha = 5, 0.7
    dq = brute_force_distances(queries, bank)
    dq = dq if squared else np.sqrt(dq)
    db = brute_force_distances(bank, bank)
    np.fill_diagonal(db, np.inf)
    db = db if squared else np.sqrt(db)
    order_q, order_b = np.argsort(dq, axis=1)[:, :k], np.argsort(db, axis=1)[:, :k]
    dist_q = np.take_along_axis(dq, order_q, 1)
    density = np.take_along_axis(db, order_b, 1).mean(1)
    kdist = np.take_along_axis(db, order_b, 1)[:, -1]
    lrd_bank = 1 / np.maximum(np.take_along_axis(db, order_b, 1), kdist[order_b]).mean(1)
    lrd_q = 1 / np.maximum(dist_q, kdist[order_q]).mean(1)
    pair = np.array([db[np.ix_(o, o)][~np.eye(k, dtype=bool)].mean() for o in order_q])
    expected = {
        "nn1": dist_q[:, 0],
        "ldknn": dist_q[:, 0] - alpha * density[order_q[:, 0]],
        "knn": dist_q.mean(1),
        "kthnn": dist_q[:, -1],
        "lof": lrd_bank[order_q].mean(1) / lrd_q,
        "ldof": dist_q.mean(1) / pair,
    }
    methods = [ScoringMethod(name, k, alpha, squared) for name in expected]
    got = BankScorer(BankIndex(bank)).score(methods, queries)
    for m in methods:
        np.testing.assert_allclose(got[m], expected[m.name], rtol=2e-4, atol=2e-4, err_msg=m.name)


def test_ldknn_corrects_density_bias(bank_and_queries):
    """A query just outside the dense cluster is more anomalous than one inside the sparse cluster
    at the same distance from its nearest neighbour: LDKNN says so, 1-NN cannot."""
    bank, _ = bank_and_queries
    index = BankIndex(bank)
    scorer = BankScorer(index)
    dense_q = bank[0] + 0.8 / np.sqrt(8)
    sparse_q = bank[200] + 0.8 / np.sqrt(8)
    q = np.stack([dense_q, sparse_q]).astype(np.float32)
    ld = ScoringMethod("ldknn", k=5, squared=False)
    scores = scorer.score([ld], q)[ld]
    assert scores[0] > scores[1]


def test_parse_method():
    m = parse_method("ldknn:k=5,alpha=0.5", k=9)
    assert (m.name, m.k, m.alpha) == ("ldknn", 5, 0.5)
    assert parse_method("KNN", k=3).k == 3
    with pytest.raises(ValueError, match="unknown scoring method"):
        parse_method("patchcore")
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_method("knn:q=3")


def test_k_larger_than_bank_is_a_clear_error():
    stats = BankScorer(BankIndex(np.eye(4, dtype=np.float32))).stats
    with pytest.raises(ValueError, match="bank has 4"):
        stats.local_density(4, True)


def test_greedy_coreset_covers_clusters():
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 50, (5, 16))
    bank = np.vstack([c + rng.normal(0, 0.1, (200, 16)) for c in centres]).astype(np.float32)
    chosen = greedy_coreset(bank, ratio=5 / 1000, projection_dim=8)
    assert len(chosen) == 5 and len(set(chosen // 200)) == 5  # one point from every cluster
    assert np.array_equal(greedy_coreset(bank, 1.0), np.arange(1000))


def test_neighbours_are_exact_where_faiss_rounding_is_not():
    """Large feature norms, small distances: faiss's |q|^2 + |b|^2 - 2qb loses the distances and can
    swap near-equal neighbours; the bank statistics must still match float64 brute force, and a
    lazily computed density must equal the whole-bank one whatever batch it was computed in."""
    rng = np.random.default_rng(3)
    bank = (50.0 + rng.normal(0, 0.05, (3000, 32))).astype(np.float32)
    d2 = brute_force_distances(bank, bank)
    np.fill_diagonal(d2, np.inf)
    expected = np.sort(d2, axis=1)[:, :5].mean(axis=1)
    full = BankScorer(BankIndex(bank)).stats.local_density(5, True)
    np.testing.assert_allclose(full, expected, rtol=1e-4)
    some = rng.choice(3000, 37, replace=False)
    lazy = BankScorer(BankIndex(bank)).stats.local_density(5, True, some)
    np.testing.assert_allclose(lazy, full[some], rtol=1e-6)


@pytest.mark.parametrize("squared", [True, False])
def test_ldof_is_exact_for_large_feature_norms(squared):
    """LDOF's inner distance (mean pairwise distance of the K neighbours) against float64 brute force
    on a bank offset by 1e3: |a|^2 + |b|^2 - 2ab in float32 is off by several percent there."""
    rng = np.random.default_rng(5)
    bank = (1e3 + rng.normal(0, 1, (400, 16))).astype(np.float32)
    queries = (1e3 + rng.normal(0, 1.2, (50, 16))).astype(np.float32)
    k = 5
    dq = brute_force_distances(queries, bank)
    order = np.argsort(dq, axis=1)[:, :k]
    v = bank[order].astype(np.float64)
    pairs = ((v[:, :, None] - v[:, None]) ** 2).sum(-1)
    dist = (lambda x: x) if squared else np.sqrt
    inner = dist(pairs).sum((1, 2)) / (k * (k - 1))
    expected = dist(np.take_along_axis(dq, order, 1)).mean(1) / inner
    method = ScoringMethod("ldof", k, squared=squared)
    scorer = BankScorer(BankIndex(bank))
    np.testing.assert_allclose(scorer.score([method], queries)[method], expected, rtol=1e-5)
    # in chunks of 7 queries, and differences made 3 queries at a time: the same numbers
    np.testing.assert_allclose(scorer._mean_pairwise(order, squared, chunk=7, max_elements=3 * 10 * 16),
                               inner, rtol=1e-5)


def test_a_methods_spec_parses_back_to_the_method():
    from reb_dist.core.ldknn import ScoringMethod, parse_method

    for method in (ScoringMethod("ldknn", 12, 0.35), ScoringMethod("knn", 4, 0.0), ScoringMethod("kthnn", 7),
                   ScoringMethod("nn1"), ScoringMethod("gde")):
        again = parse_method(method.spec, k=method.k if method.name in ("nn1", "gde") else 99, alpha=method.alpha)
        assert again == method, method.spec
    assert ScoringMethod("ldknn", 9, 0.1).spec == "ldknn:k=9,alpha=0.1"  # what selection.json has always held


def test_ldof_pairwise_means_are_right_when_the_step_does_not_divide_the_chunk():
    """The README's `--methods ...,ldof` crashed on the sample's bottle: a chunk of 4096 rows taken 1533
    at a time left a short last step, written into a 1533-row slice (a broadcast error)."""
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(300, 6)).astype(np.float32)
    nbr = rng.integers(0, 300, size=(25, 4))
    scorer = BankScorer(BankIndex(bank))
    got = scorer._mean_pairwise(nbr, squared=False, chunk=10, max_elements=6 * 6 * 4)  # steps of 4 in chunks of 10
    v = bank[nbr]
    pairs = [np.linalg.norm(v[:, i] - v[:, j], axis=1) for i in range(4) for j in range(i + 1, 4)]
    np.testing.assert_allclose(got, np.mean(pairs, axis=0), rtol=1e-5)
