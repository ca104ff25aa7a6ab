"""A shard actor serves only the bank it was opened for: its file is checked against the bank's
fingerprint at every (re)load, and banks given one shard folder never share files."""

import os

import numpy as np
import pytest

from reb_dist.config import BankConfig
from reb_dist.core.ldknn import BankIndex, BankScorer, ScoringMethod
from reb_dist.distributed import sharded_bank
from reb_dist.distributed.sharded_bank import BankShard, ShardedBank, sharded_index_factory
from reb_dist.errors import ModelFileError
from reb_dist.io.shard_file import bank_fingerprint, write_shards
from reb_dist.pipelines.bank import shard_folder

SIZES = [500, 1900]
TOL = dict(rtol=1e-5, atol=1e-4)
METHODS = [ScoringMethod("ldknn"), ScoringMethod("knn")]


def dies_in_a_search(armed, marker):
    """A BankShard whose shard 1 exits inside one search once `armed` exists (and never again), so
    Ray restarts it (constructor included) and retries the call: a deterministic mid-search kill."""

    class DiesInASearch(BankShard):
        def search(self, queries, k, *args):
            if self.offset > 0 and armed.exists() and not marker.exists():
                marker.write_text(f"{os.getpid()} search")
                os._exit(1)
            return super().search(queries, k, *args)

    return DiesInASearch


def test_a_restarted_shard_whose_file_now_holds_another_bank_fails_the_search(local_ray, bank_and_queries,
                                                                              tmp_path, monkeypatch):
    """The user's reproduction: the folder is rewritten by another bank of the same shapes, shard 1
    dies, and Ray restarts it from the rewritten file: an error, never the other bank's neighbours."""
    bank, queries = bank_and_queries
    other = np.random.default_rng(11).permutation(bank)  # same shapes and values, other order
    armed, marker = tmp_path / "armed", tmp_path / "killed"
    monkeypatch.setattr(sharded_bank, "BankShard", dies_in_a_search(armed, marker))
    want_dist, want_ids = BankIndex(bank).search(queries, 9)
    folder = tmp_path / "bank"
    with ShardedBank.create(bank, folder, 2, SIZES, cpus_per_shard=0.5, batch_size=64) as sharded:
        dist, ids = sharded.search(queries, 9)
        np.testing.assert_array_equal(ids, want_ids)

        write_shards(other, folder, 2, SIZES)  # e.g. the few-shot run of the same category
        armed.write_text("")
        with pytest.raises(ModelFileError) as err:
            sharded.search(queries, 9)
    assert marker.exists()  # shard 1 really died inside the search and was reloaded
    assert sharded.bank_id == bank_fingerprint(bank, 2, SIZES)
    message = str(err.value)
    assert message.startswith("bank shard 1 could not (re)load its file during search; no scores were returned")
    assert str(folder / "shard-001-of-002.safetensors") in message
    assert f"expected shard 1 of bank {bank_fingerprint(bank, 2, SIZES)}" in message
    assert f"found shard 1 of 2 of bank {bank_fingerprint(other, 2, SIZES)}" in message


def test_two_banks_with_one_shard_dir_get_their_own_files_and_score_as_in_process(local_ray, bank_and_queries,
                                                                                 tmp_path, monkeypatch):
    """A full and a few-shot bank of one category, one sweep, one bank.shard_dir: distinct files,
    each scores as its own in-process index, also after a shard of the first is restarted."""
    bank, queries = bank_and_queries
    few = bank[::6]
    armed, marker = tmp_path / "armed", tmp_path / "killed"
    monkeypatch.setattr(sharded_bank, "BankShard", dies_in_a_search(armed, marker))
    cfg = BankConfig(shards=2, shard_cpus=0.5, shard_dir=str(tmp_path / "shards"))
    folder = shard_folder(cfg, tmp_path / "out", "bottle")
    assert folder == tmp_path / "shards" / "bottle"
    full_bank = sharded_index_factory(cfg, folder)(bank)
    try:
        few_bank = sharded_index_factory(cfg, folder)(few)  # written after the full bank, to the same setting
        try:
            assert not set(full_bank.paths) & set(few_bank.paths)
            assert {os.path.dirname(p) for p in full_bank.paths} == {str(folder / bank_fingerprint(bank, 2))}
            assert {os.path.dirname(p) for p in few_bank.paths} == {str(folder / bank_fingerprint(few, 2))}
            armed.write_text("")  # the full bank's shard 1 dies in its next search and reloads its file
            for sharded, vectors in ((full_bank, bank), (few_bank, few)):
                got = BankScorer(sharded).score(METHODS, queries)
                want = BankScorer(BankIndex(vectors)).score(METHODS, queries)
                for m in METHODS:
                    np.testing.assert_allclose(got[m], want[m], rtol=1e-4, atol=1e-4, err_msg=m.label)
                dist, ids = sharded.search(queries, 9)
                want_dist, want_ids = BankIndex(vectors).search(queries, 9)
                np.testing.assert_array_equal(ids, want_ids)
                np.testing.assert_allclose(dist, want_dist, **TOL)
            assert marker.exists()
        finally:
            few_bank.close()
    finally:
        full_bank.close()
