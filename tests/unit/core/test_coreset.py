"""Coresets: the fast greedy against the plain one, the random baseline, and the coverage radius."""

import importlib

import numpy as np
import pytest
import torch

from reb_dist.core.ldknn import (select_coreset, coverage_radius, fast_greedy_coreset, greedy_coreset,
                                 random_coreset)

coreset_module = importlib.import_module("reb_dist.core.ldknn.coreset")

METHODS = ["fast", "greedy", "random"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits for the first (seconds on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_blocks(monkeypatch):
    """Distance blocks of a few hundred points, so a 3,000-point bank spans many of them."""
    monkeypatch.setattr(coreset_module, "_BLOCK", 256)
    monkeypatch.setattr(coreset_module, "_RADIUS_BLOCK", 100)


@pytest.fixture(scope="module")
def bank():
    """3,000 x 32: 30 clusters of very different sizes and spreads, far from the origin."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 200, 30)
    parts = [rng.normal(0, 5, 32) + rng.normal(0, rng.uniform(0.05, 1.5), (s, 32)) for s in sizes]
    bank = np.vstack(parts)[:3000] + 50
    return bank.astype(np.float32)


def brute_force_radius(bank, ids):
    d = ((bank[:, None, :].astype(np.float64) - bank[ids][None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d.min(1).max()))


@pytest.mark.parametrize("ratio", [0.002, 0.02, 0.1, 0.3])
@pytest.mark.parametrize("projection_dim, candidates", [(16, 1024), (16, 8), (0, 64)])
def test_fast_selects_what_the_plain_greedy_selects(bank, ratio, projection_dim, candidates, small_blocks):
    # the round's picks are provably the bank's farthest points, so on continuous data (no ties)
    # the two differ only if float rounding reorders two near-equal distances: not on this bank;
    # 8 candidates force many rounds, i.e. many stops at the bound
    fast = fast_greedy_coreset(bank, ratio, projection_dim, seed=1, candidates=candidates)
    assert np.array_equal(fast, greedy_coreset(bank, ratio, projection_dim, seed=1))


def test_fast_covers_as_well_as_greedy_and_random_clearly_worse(bank):
    radius = {m: coverage_radius(bank, select_coreset(bank, 0.05, m, projection_dim=16)) for m in METHODS}
    assert radius["fast"] <= 1.0001 * radius["greedy"]
    assert radius["random"] > 1.5 * radius["greedy"]


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("method", ["random", "greedy"])  # greedy: many points close to the radius
def test_coverage_radius_is_brute_force(bank, method, blocks, request):
    if blocks == "many":
        request.getfixturevalue("small_blocks")
    ids = select_coreset(bank, 0.03, method, projection_dim=16, seed=2)
    assert coverage_radius(bank, ids) == pytest.approx(brute_force_radius(bank, ids), rel=1e-9)
    proj = np.random.default_rng(3).normal(size=(32, 8)).astype(np.float32)
    assert coverage_radius(bank, ids, proj) == pytest.approx(brute_force_radius(bank @ proj, ids), rel=1e-6)
    assert coverage_radius(bank, np.arange(len(bank))) == 0.0
    with pytest.raises(ValueError, match="no chosen"):
        coverage_radius(bank, np.array([], dtype=np.int64))


@pytest.mark.parametrize("method", METHODS)
def test_sizes_and_ratio_edge_cases(bank, method):
    n = len(bank)
    ids = select_coreset(bank, 0.1, method, projection_dim=16)
    assert len(ids) == 300 and len(np.unique(ids)) == 300 and np.all(np.diff(ids) > 0)
    assert np.array_equal(select_coreset(bank, 1.0, method), np.arange(n))
    assert len(select_coreset(bank, 1e-9, method)) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            select_coreset(bank, bad, method)


def test_fast_keeps_distinct_points_of_a_bank_with_duplicates():
    bank = np.repeat(np.random.default_rng(4).normal(size=(10, 8)), 10, axis=0).astype(np.float32)
    assert len(np.unique(fast_greedy_coreset(bank, 0.1, candidates=4) // 10)) == 10  # one per value
    ids = fast_greedy_coreset(bank, 0.5, candidates=4)  # more points than values: still 50 distinct
    assert len(np.unique(ids)) == 50 and coverage_radius(bank, ids) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_under_a_seed(bank, method):
    a = select_coreset(bank, 0.05, method, projection_dim=16, seed=5)
    assert np.array_equal(a, select_coreset(bank, 0.05, method, projection_dim=16, seed=5))
    assert not np.array_equal(a, select_coreset(bank, 0.05, method, projection_dim=16, seed=6))


def test_unknown_method_is_a_clear_error(bank):
    with pytest.raises(ValueError, match="unknown coreset method"):
        select_coreset(bank, 0.1, "kmeans")
