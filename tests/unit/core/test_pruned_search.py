"""The pruned exact search: the brute-force K nearest (same ids, same distances, ties by id) while
visiting only part of the bank, for patches near the bank, far from it, duplicated, and for K larger
than the nearest lists hold."""

from __future__ import annotations

import numpy as np
import pytest

from reb_dist.core.ldknn import BankIndex, pruned
from reb_dist.core.ldknn.pruned import PrunedExactSearch
from tests.neighbours import brute_force


def clustered_bank(n: int = 6000, dim: int = 24, blobs: int = 30, seed: int = 0) -> np.ndarray:
    """Points in Gaussian blobs of different widths, as patch features group by what they show."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (blobs, dim))
    widths = rng.uniform(0.5, 2.0, blobs)
    which = rng.integers(0, blobs, n)
    return (centres[which] + rng.normal(0, 1, (n, dim)) * widths[which, None]).astype(np.float32)


@pytest.fixture(scope="module")
def bank_and_queries():
    bank = clustered_bank()
    rng = np.random.default_rng(1)
    near = bank[rng.choice(len(bank), 300, replace=False)] + rng.normal(0, 0.3, (300, bank.shape[1]))
    far = rng.normal(0, 25, (40, bank.shape[1]))  # anomalies: far from every blob
    between = (bank[rng.choice(len(bank), 60)] + bank[rng.choice(len(bank), 60)]) / 2
    copies = bank[rng.choice(len(bank), 40)]  # distance 0 to a bank point
    queries = np.concatenate([near, far, between, copies]).astype(np.float32)
    return bank, queries


@pytest.mark.parametrize("k", [1, 9, 40])
def test_pruned_search_returns_the_brute_force_neighbours(bank_and_queries, k):
    bank, queries = bank_and_queries
    search = PrunedExactSearch(bank, lists=40)
    dist, ids = search.search(queries, k)
    want_dist, want_ids = brute_force(bank, queries, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)
    assert search.visited < 0.5  # and it got there without visiting the whole bank


def test_pruning_skips_most_of_the_bank_for_patches_near_it(bank_and_queries):
    bank, queries = bank_and_queries
    search = PrunedExactSearch(bank, lists=40)
    search.search(queries[:300], 1)  # the queries near bank points
    near = search.visited
    assert near < 0.2
    search.search(queries[300:340], 1)  # far from every blob: fewer lists can be ruled out
    assert search.visited > 2 * near


@pytest.mark.parametrize("dim", [8, 24])
def test_on_one_continuous_cloud_the_bisector_bound_prunes_and_stays_exact(dim):
    """Patch features form one cloud, not separate blobs: k-means cells touch, a cell's radius
    reaches past its neighbours and only the bisector bound rules much out (the ball bound alone
    visited about half of this bank)."""
    rng = np.random.default_rng(dim)
    scale = 1 / np.sqrt(np.arange(1, dim + 1))  # decaying variances, as features' principal axes
    bank = (rng.normal(0, 1, (6000, dim)) * scale).astype(np.float32)
    queries = (bank[:400] + rng.normal(0, 0.05, (400, dim)) * scale).astype(np.float32)
    search = PrunedExactSearch(bank, lists=40)
    for k in (1, 9):
        dist, ids = search.search(queries, k)
        want_dist, want_ids = brute_force(bank, queries, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(dist, want_dist)
        if k == 1:  # (a 9th nearest point lies about as far as a small cloud's cells are wide)
            assert search.visited < 0.1


def test_ties_go_to_the_lowest_id_and_duplicates_are_all_found():
    bank = clustered_bank(2000, 8, 10)
    bank = np.concatenate([bank, bank[:500]])  # rows 2000..2499 repeat rows 0..499
    queries = bank[[3, 250, 499, 1500]] + 0.0
    dist, ids = PrunedExactSearch(bank, lists=12).search(queries, 3)
    np.testing.assert_array_equal(ids[:3, :2], [[3, 2003], [250, 2250], [499, 2499]])
    np.testing.assert_array_equal(dist[:3, :2], 0)
    np.testing.assert_array_equal(ids, brute_force(bank, queries, 3)[1])


def test_k_beyond_what_the_nearest_lists_hold_is_still_exact(bank_and_queries):
    bank, queries = bank_and_queries
    search = PrunedExactSearch(bank, lists=200)  # about 30 points a list: 2 lists hold fewer than K
    dist, ids = search.search(queries[:50], 80)
    want_dist, want_ids = brute_force(bank, queries[:50], 80)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)


def test_k_larger_than_the_bank_and_no_queries():
    bank = clustered_bank(300, 6, 4)
    search = PrunedExactSearch(bank, lists=4)
    dist, ids = search.search(bank[:5], 500)
    assert ids.shape == (5, 300)
    np.testing.assert_array_equal(np.sort(ids, 1), np.broadcast_to(np.arange(300), (5, 300)))
    assert search.search(np.empty((0, 6), np.float32), 3)[1].shape == (0, 3)


def test_a_large_bank_index_prunes_its_exact_searches_and_answers_as_brute_force(bank_and_queries, monkeypatch):
    bank, queries = bank_and_queries
    monkeypatch.setattr(pruned, "PRUNE_FROM", 1000)
    index = BankIndex(bank, neighbour_search="exact", query_search="exact")
    assert index.prunes and index.index is None  # no faiss flat copy beside the pruned one
    dist, ids = index.search(queries, 5)
    want_dist, want_ids = brute_force(bank, queries, 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)
    points = np.arange(0, len(bank), 37)
    got = index.search_bank_points(points, 6)  # the density build: K nearest OTHER points
    flat = BankIndex(bank[:999])  # below PRUNE_FROM: faiss's flat index, as before
    assert not flat.prunes and flat.index is not None
    faithful = BankIndex(bank, neighbour_search="ivf", query_search="ivf")
    assert not faithful.prunes and faithful.index is not None  # its few exact searches: no k-means
    index.use_pruning(False)  # brute force, for comparisons: the same answers
    assert not index.prunes and index.index is not None
    np.testing.assert_array_equal(index.search(queries, 5)[1], ids)
    want = brute_force(bank, bank[points], 7)[1]
    for row, point in enumerate(points):
        np.testing.assert_array_equal(got[1][row], [i for i in want[row] if i != point][:6])
