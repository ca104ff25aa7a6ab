"""The neighbour-distance formulas (reb_dist.core.ldknn.formulas) are what they say, run on numpy and
torch alike, and every numpy path that scores with them agrees: BankScorer, the selection's
neighbour tables, and BankStats's densities (averaged in float64 there, by its own code)."""

import numpy as np
import pytest
import torch

from reb_dist.core.ldknn import BankIndex, BankScorer, BankStats, ScoringMethod
from reb_dist.core.ldknn.formulas import NEIGHBOUR_METHODS, local_density, neighbour_scores
from reb_dist.core.ldknn.selection import knn_maps, ldknn_maps, method_maps, neighbour_table


def _sorted_dist2(rng, rows=40, k=12):
    return np.sort(rng.uniform(0.01, 4.0, (rows, k)).astype(np.float32), axis=1)


def test_formulas_by_their_definitions():
    dist2 = np.array([[1.0, 4.0, 9.0, 16.0]], np.float32)  # distances 1, 2, 3, 4
    density = np.array([0.5], np.float32)
    expect = {("nn1", True): 1.0, ("nn1", False): 1.0, ("knn", True): 14 / 3, ("knn", False): 2.0,
              ("kthnn", True): 9.0, ("kthnn", False): 3.0, ("ldknn", True): 1.0 - 2.0 * 0.5,
              ("ldknn", False): 1.0 - 2.0 * 0.5}
    for (name, squared), want in expect.items():
        got = neighbour_scores(ScoringMethod(name, 3, 2.0, squared), dist2, density)
        np.testing.assert_allclose(got, [want], rtol=1e-6)
    np.testing.assert_allclose(local_density(dist2, 2, False), [1.5])
    np.testing.assert_allclose(local_density(dist2, 3, True), [14 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="density"):
        neighbour_scores(ScoringMethod("ldknn"), dist2)
    with pytest.raises(ValueError, match="lof is not scored"):
        neighbour_scores(ScoringMethod("lof"), dist2)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("name", NEIGHBOUR_METHODS)
def test_formulas_run_on_torch_tensors_as_on_numpy_arrays(name, squared):
    rng = np.random.default_rng(0)
    dist2, density = _sorted_dist2(rng), rng.uniform(0, 2, 40).astype(np.float32)
    method = ScoringMethod(name, 5, 0.7, squared)
    want = neighbour_scores(method, dist2, density)
    got = neighbour_scores(method, torch.from_numpy(dist2), torch.from_numpy(density), sqrt=torch.sqrt)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and want.dtype == np.float32
    # float32 either way, to an ulp of the distances (ldknn's difference can be near 0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * np.sqrt(dist2).max())
    np.testing.assert_allclose(local_density(torch.from_numpy(dist2), 5, squared, torch.sqrt).numpy(),
                               local_density(dist2, 5, squared), rtol=1e-6)


@pytest.fixture(scope="module")
def bank_and_features():
    rng = np.random.default_rng(3)
    bank = np.vstack([rng.normal(0, 0.2, (300, 6)), rng.normal(2, 1.0, (300, 6))]).astype(np.float32)
    feats = rng.normal(1, 1.2, (5, 4, 4, 6)).astype(np.float32)
    return BankIndex(bank), feats


@pytest.mark.parametrize("squared", [True, False])
def test_selection_maps_equal_the_bank_scorer(bank_and_features, squared):
    """ldknn_maps / knn_maps / method_maps from one table are BankScorer's scores for each (K, alpha)."""
    index, feats = bank_and_features
    table = neighbour_table(index, feats, k_max=12, query_k=9)
    methods = [ScoringMethod("ldknn", k, alpha, squared) for k in (1, 5, 12) for alpha in (0.0, 0.6, 2.0)]
    methods += [ScoringMethod("knn", k, squared=squared) for k in (1, 4, 9)]
    want = BankScorer(index).score(methods, feats.reshape(-1, 6))
    for method in methods:
        got = (ldknn_maps(table, method.k, method.alpha, squared) if method.name == "ldknn"
               else knn_maps(table, method.k, squared))
        assert got.shape == (5, 4, 4) and got.dtype == np.float32
        if method.name == "knn":  # the same float32 formula on the same search: equal
            np.testing.assert_array_equal(got.ravel(), want[method])
        else:  # the density is averaged in float32 here, in float64 in BankStats
            np.testing.assert_allclose(got.ravel(), want[method], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(method_maps(table, method.name, method.k, method.alpha, squared), got)
    nn1 = BankScorer(index).score([ScoringMethod("nn1", squared=squared)], feats.reshape(-1, 6))
    np.testing.assert_array_equal(knn_maps(neighbour_table(index, feats, k_max=2), 1, squared).ravel(),
                                  next(iter(nn1.values())))


@pytest.mark.parametrize("squared", [True, False])
def test_bank_stats_density_is_the_shared_formula_in_float64(bank_and_features, squared):
    index, _ = bank_and_features
    points = np.array([0, 5, 17, 299, 300, 599])
    dist2, _ = index.search_bank_points(points, 7)
    want = local_density(dist2, 7, squared, dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(BankStats(index).local_density(7, squared, points), want)


def test_with_params():
    method = ScoringMethod("ldknn", 9, 1.0, False, map=ScoringMethod("knn", 3))
    assert method.with_params(k=4) == ScoringMethod("ldknn", 4, 1.0, False, map=ScoringMethod("knn", 3))
    assert method.with_params(alpha=0.5).alpha == 0.5 and method.with_params(alpha=0.5).k == 9
    assert method.with_params() == method
    with pytest.raises(ValueError, match="K must be >= 1"):
        method.with_params(k=0)
