"""Bank search without Ray: per-shard merge, float16 storage, approximate density candidates."""

import faiss
import numpy as np
import pytest
from reb_dist.distributed.sharded_bank import BankShard
from reb_dist.io.shard_file import read_shard, write_shards
from reb_dist.core.ldknn import BankIndex
from reb_dist.core.ldknn import approx
from reb_dist.core.ldknn.approx import (EXACT_UP_TO, build_approximate, ivf_lists, recall_at_k,
                                        resolve_neighbour_search)
from reb_dist.core.ldknn.search import self_search_recall
from reb_dist.core.ldknn.bank_stats import BankStats
from reb_dist.core.ldknn.search import merge_nearest

SIZES = {3: [1100, 150, 1150]}  # uneven on purpose
TOL = dict(rtol=1e-5, atol=1e-4)




def test_per_shard_results_merged_by_global_minimum_equal_one_index(bank_and_queries, tmp_path):
    """The merge itself, in one process: no Ray needed to check the arithmetic."""
    bank, queries = bank_and_queries
    single = BankIndex(bank).search(queries, 9)
    shards = [BankShard(str(p)) for p in write_shards(bank, tmp_path, 3, SIZES[3])]
    merged = merge_nearest([s.search(queries, 9) for s in shards], 9)
    np.testing.assert_array_equal(merged[1], single[1])
    np.testing.assert_allclose(merged[0], single[0], **TOL)


def test_float16_bank_halves_storage_and_searches_its_rounded_vectors(bank_and_queries, tmp_path):
    bank, queries = bank_and_queries
    half = BankIndex(bank, dtype="float16")
    assert half.bank.nbytes * 2 == bank.nbytes
    rounded = BankIndex(bank.astype(np.float16).astype(np.float32))
    dist, ids = half.search(queries, 9)
    np.testing.assert_array_equal(ids, rounded.search(queries, 9)[1])
    np.testing.assert_allclose(dist, rounded.search(queries, 9)[0], **TOL)
    path = write_shards(bank, tmp_path, 1, dtype="float16")[0]
    assert read_shard(path)[0].dtype == np.float16


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_density_path_has_high_recall_and_never_underestimates(bank_and_queries, kind):
    bank, _ = bank_and_queries
    exact = BankIndex(bank)
    approx = BankIndex(bank, neighbour_search=kind)
    points = np.arange(0, len(bank), 3)
    exact_d, exact_i = exact.search_bank_points(points, 9)
    found_d, found_i = approx.search_bank_points(points, 9)
    assert recall_at_k(exact_i, found_i) > 0.9
    # candidates are re-ranked exactly, so a missed neighbour can only make a distance larger
    assert (found_d.mean(1) >= exact_d.mean(1) - 1e-4).all()
    # and test patches are still searched exactly
    np.testing.assert_array_equal(approx.search(bank[:50], 3)[1], exact.search(bank[:50], 3)[1])


def test_auto_neighbour_search_depends_on_bank_size():
    assert resolve_neighbour_search("auto", EXACT_UP_TO) == "exact"
    assert resolve_neighbour_search("auto", EXACT_UP_TO + 1) == "ivf"
    with pytest.raises(ValueError, match="neighbour search"):
        resolve_neighbour_search("lsh", 10)


def test_ivf_nprobe_is_calibrated_per_k_to_the_recall_target(bank_and_queries):
    bank, _ = bank_and_queries
    index = BankIndex(bank, neighbour_search="ivf", query_search="ivf", recall_target=0.95)
    index.search_bank_points(np.arange(0, len(bank), 7), 9)
    nprobe, recall = index.calibration[10]  # the self-search asks for K + 1 (the point itself first)
    assert recall >= 0.95
    # the smallest nprobe that reaches it (not the next power of two): one list fewer falls short
    ivf = index.approximate_index("ivf")
    assert nprobe > 1, "the fixture should need more than one list at this target"
    rows = np.sort(np.random.default_rng(0).choice(len(bank), 1000, replace=False))
    d, i = index.search(bank[rows], 11, exact=True)
    exact_ids = np.array([r[r != p][:10] for r, p in zip(i, rows)])
    ivf.nprobe = nprobe - 1
    assert recall_at_k(exact_ids, ivf.search(bank[rows], 19)[1]) < 0.95
    # what the run reports is measured on the real search, against exact, and it meets the target
    assert self_search_recall(index, 9) >= 0.85
    # a target of 1 visits lists until the sample's neighbours are all found
    strict = BankIndex(bank, neighbour_search="ivf", recall_target=1.0)
    strict.search_bank_points(np.arange(10), 9)
    assert strict.calibration[10][1] == 1.0 and strict.calibration[10][0] >= nprobe
    # a fixed nprobe is used as given, and nothing is calibrated
    fixed = BankIndex(bank, neighbour_search="ivf", nprobe=2)
    fixed.search_bank_points(np.arange(10), 9)
    assert fixed.calibration == {} and faiss.extract_index_ivf(fixed.approximate_index("ivf")).nprobe == 2


def test_densities_of_a_smaller_k_come_from_a_larger_search_without_searching_again(bank_and_queries):
    bank, _ = bank_and_queries
    points = np.arange(0, len(bank), 5)
    wide, direct = BankStats(BankIndex(bank)), BankStats(BankIndex(bank))
    calls = []
    search = wide.index.search_bank_points
    wide.index.search_bank_points = lambda *a, **kw: calls.append(a[1]) or search(*a, **kw)
    wide.neighbours(25, points)
    for k in (1, 9, 25):
        np.testing.assert_array_equal(wide.local_density(k, True, points), direct.local_density(k, True, points))
    assert calls == [25]  # K 1 and 9 were read from K 25's columns
    wide.local_density(9, True, points + 1)  # points the wide search never saw are searched at K 9
    assert calls == [25, 9]
