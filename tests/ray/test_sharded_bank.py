"""A bank sharded over real Ray actors gives what one index over the whole bank gives; a killed shard
is restarted from its file; float16 storage and the approximate density path behave as documented."""

import os

import faiss
import numpy as np
import pytest
import ray

from reb_dist.distributed import sharded_bank
from reb_dist.distributed.sharded_bank import BankShard, ShardedBank
from reb_dist.io.shard_file import read_shard, shard_bounds, write_shards
from reb_dist.errors import ModelFileError, RebError
from reb_dist.core.ldknn import BankIndex, BankScorer, ScoringMethod
from reb_dist.core.ldknn import approx
from reb_dist.core.ldknn.approx import (EXACT_UP_TO, build_approximate, ivf_lists, recall_at_k,
                                        resolve_neighbour_search)
from reb_dist.core.ldknn.search import merge_nearest

SIZES = {1: [2400], 2: [500, 1900], 3: [1100, 150, 1150]}  # uneven on purpose
TOL = dict(rtol=1e-5, atol=1e-4)








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


def test_a_shard_killed_mid_search_is_restarted_from_its_file(local_ray, bank_and_queries, tmp_path, monkeypatch):
    """Shard 1's process dies inside its first search call (the call itself exits, so the kill cannot
    land before or after the search); Ray restarts it from its file and retries the call."""
    bank, queries = bank_and_queries
    marker = tmp_path / "killed"

    class DiesInItsFirstSearch(BankShard):
        def search(self, queries, k, *args):
            if self.offset > 0 and not marker.exists():  # shard 1, once: the restarted actor answers
                marker.write_text(f"{os.getpid()} search")
                os._exit(1)
            return super().search(queries, k, *args)

    monkeypatch.setattr(sharded_bank, "BankShard", DiesInItsFirstSearch)  # what ShardedBank wraps in actors
    want_dist, want_ids = BankIndex(bank).search(queries, 9)
    want = BankScorer(BankIndex(bank)).score([ScoringMethod("ldknn")], queries)[ScoringMethod("ldknn")]
    with ShardedBank.create(bank, tmp_path / "bank", 2, SIZES[2], cpus_per_shard=0.5, batch_size=32) as sharded:
        before = sharded.shard_pids()
        assert not marker.exists()
        dist, ids = sharded.search(queries, 9)  # 22 pipelined batches; shard 1 dies in the first
        after = sharded.shard_pids()
        again = BankScorer(sharded).score([ScoringMethod("ldknn")], queries)[ScoringMethod("ldknn")]
    assert marker.read_text() == f"{before[1]} search"  # the original shard-1 process, inside search
    assert after[0] == before[0] and after[1] != before[1]  # shard 1 is a new process
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(dist, want_dist, **TOL)
    np.testing.assert_allclose(again, want, rtol=1e-4, atol=1e-4)


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
    with pytest.raises(ModelFileError, match="broken.safetensors: not a reb-dist bank shard file"):
        read_shard(broken)
    assert not list((tmp_path / "a").glob("*.tmp"))  # written atomically










def test_auto_is_decided_by_the_whole_bank_not_by_each_shard(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(approx, "EXACT_UP_TO", 500)  # the bank below is 600 points, each shard 300
    bank = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    with ShardedBank.create(bank, tmp_path, 2, cpus_per_shard=0.5) as sharded:
        assert sharded.neighbour_search == "ivf"
    with ShardedBank.create(bank, tmp_path / "exact", 2, neighbour_search="exact", cpus_per_shard=0.5) as sharded:
        assert sharded.neighbour_search == "exact"
