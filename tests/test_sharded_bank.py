"""A bank sharded over real Ray actors gives what one index over the whole bank gives; a killed shard
is restarted from its file; float16 storage and the approximate density path behave as documented."""

import threading

import faiss
import numpy as np
import pytest
import ray

from reb_dist.distributed.sharded_bank import BankShard, ShardedBank, read_shard, shard_bounds, write_shards
from reb_dist.errors import ModelFileError, RebError
from reb_dist.core.ldknn import BankIndex, BankScorer, ScoringMethod
from reb_dist.core.ldknn import approx
from reb_dist.core.ldknn.approx import (EXACT_UP_TO, build_approximate, ivf_lists, recall_at_k, resolve_neighbour_search,
                                   scaled_nprobe)
from reb_dist.core.ldknn.search import merge_nearest

SIZES = {1: [2400], 2: [500, 1900], 3: [1100, 150, 1150]}  # uneven on purpose
TOL = dict(rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def bank_and_queries():
    rng = np.random.default_rng(7)
    # clusters of very different spread, so densities differ and neighbours cross shard borders
    centres = rng.normal(0, 4, (12, 24))
    spread = rng.uniform(0.05, 1.5, 12)
    labels = rng.integers(0, 12, 2400)
    bank = (centres[labels] + rng.normal(0, 1, (2400, 24)) * spread[labels, None]).astype(np.float32)
    queries = (centres[rng.integers(0, 12, 700)] + rng.normal(0, 1.2, (700, 24))).astype(np.float32)
    return bank, queries


def test_shard_bounds_cover_the_bank_once():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(10, 2, [1, 9]) == [(0, 1), (1, 10)]
    with pytest.raises(ValueError, match="do not split"):
        shard_bounds(10, 2, [5, 4])
    with pytest.raises(ValueError, match="cannot split"):
        shard_bounds(2, 3)


def test_per_shard_results_merged_by_global_minimum_equal_one_index(bank_and_queries, tmp_path):
    """The merge itself, in one process: no Ray needed to check the arithmetic."""
    bank, queries = bank_and_queries
    single = BankIndex(bank).search(queries, 9)
    shards = [BankShard(str(p)) for p in write_shards(bank, tmp_path, 3, SIZES[3])]
    merged = merge_nearest([s.search(queries, 9) for s in shards], 9)
    np.testing.assert_array_equal(merged[1], single[1])
    np.testing.assert_allclose(merged[0], single[0], **TOL)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_sharded_search_and_densities_equal_a_single_index(local_ray, bank_and_queries, tmp_path, num_shards):
    bank, queries = bank_and_queries
    single = BankScorer(BankIndex(bank))
    with ShardedBank.create(bank, tmp_path, num_shards, SIZES[num_shards], cpus_per_shard=0.5,
                            batch_size=256) as sharded:
        assert len(sharded) == len(bank) and sharded.num_shards == num_shards
        dist, ids = sharded.search(queries, 9)
        want_dist, want_ids = single.index.search(queries, 9)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(dist, want_dist, **TOL)

        # densities: each shard's points against ALL shards, not only their own
        scorer = BankScorer(sharded)
        some = np.random.default_rng(0).choice(len(bank), 600, replace=False)
        got_d, got_i = scorer.stats.neighbours(9, some)
        exp_d, exp_i = single.stats.neighbours(9, some)
        np.testing.assert_array_equal(got_i, exp_i)
        np.testing.assert_allclose(got_d, exp_d, **TOL)
        shard_of_point = np.searchsorted(sharded.offsets, some, side="right") - 1
        shard_of_nbr = np.searchsorted(sharded.offsets, got_i, side="right") - 1
        if num_shards > 1:  # the test means something only if neighbours do cross shards
            assert (shard_of_nbr != shard_of_point[:, None]).any()

        methods = [ScoringMethod("ldknn"), ScoringMethod("knn"), ScoringMethod("lof", k=5),
                   ScoringMethod("ldof", k=5)]
        got, want = scorer.score(methods, queries), single.score(methods, queries)
        for m in methods:
            np.testing.assert_allclose(got[m], want[m], rtol=1e-4, atol=1e-4, err_msg=m.label)


def test_a_shard_killed_mid_search_is_restarted_from_its_file(local_ray, bank_and_queries, tmp_path):
    bank, queries = bank_and_queries
    want = BankScorer(BankIndex(bank)).score([ScoringMethod("ldknn")], queries)
    with ShardedBank.create(bank, tmp_path, 2, SIZES[2], cpus_per_shard=0.5, batch_size=32) as sharded:
        before = sharded.shard_pids()
        # 22 pipelined batches; the kill lands while they run (or, on a fast machine, just after:
        # the restart is then checked by the second search)
        killer = threading.Timer(0.2, lambda: ray.kill(sharded.actors[1], no_restart=False))
        killer.start()
        got = BankScorer(sharded).score([ScoringMethod("ldknn")], queries)
        killer.join()
        again = BankScorer(sharded).score([ScoringMethod("ldknn")], queries)
        after = sharded.shard_pids()
    assert after[0] == before[0] and after[1] != before[1]  # shard 1 is a new process
    for result in (got, again):
        np.testing.assert_allclose(result[ScoringMethod("ldknn")], want[ScoringMethod("ldknn")], rtol=1e-4, atol=1e-4)


def test_a_shard_lost_beyond_its_restarts_is_an_error_not_a_partial_result(local_ray, bank_and_queries, tmp_path):
    bank, queries = bank_and_queries
    with ShardedBank.create(bank, tmp_path, 2, cpus_per_shard=0.5, max_restarts=0) as sharded:
        ray.kill(sharded.actors[0], no_restart=True)
        with pytest.raises(RebError, match=r"shard-000-of-002.safetensors: bank shard 0 failed during search"):
            sharded.search(queries, 3)


def test_shard_files_are_checked(local_ray, bank_and_queries, tmp_path):
    bank, _ = bank_and_queries
    first = write_shards(bank, tmp_path / "a", 2)
    other = write_shards(bank + 1, tmp_path / "b", 2)
    vectors, meta = read_shard(first[1])
    assert vectors.dtype == np.float32 and meta["offset"] == 1200 and meta["total"] == 2400
    with pytest.raises(RebError, match="belongs to another bank"):
        ShardedBank([first[0], other[1]], cpus_per_shard=0.5)
    with pytest.raises(RebError, match="a shard is missing"):
        ShardedBank([first[1]], cpus_per_shard=0.5)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a shard")
    with pytest.raises(ModelFileError, match="broken.safetensors: not a bank shard file"):
        read_shard(broken)
    assert not list((tmp_path / "a").glob("*.tmp"))  # written atomically


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


def test_ivf_visits_a_fixed_fraction_of_its_lists_unless_told():
    bank = np.random.default_rng(0).standard_normal((10_000, 8)).astype(np.float32)
    nlist = ivf_lists(len(bank))
    assert faiss.extract_index_ivf(build_approximate(bank, "ivf")).nprobe == scaled_nprobe(nlist)
    assert scaled_nprobe(100) == 16 and scaled_nprobe(3533) == 74  # 780k points: 3,533 lists
    assert faiss.extract_index_ivf(build_approximate(bank, "ivf", nprobe=5)).nprobe == 5


def test_auto_is_decided_by_the_whole_bank_not_by_each_shard(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(approx, "EXACT_UP_TO", 500)  # the bank below is 600 points, each shard 300
    bank = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    with ShardedBank.create(bank, tmp_path, 2, cpus_per_shard=0.5) as sharded:
        assert sharded.neighbour_search == "ivf"
    with ShardedBank.create(bank, tmp_path / "exact", 2, neighbour_search="exact", cpus_per_shard=0.5) as sharded:
        assert sharded.neighbour_search == "exact"
