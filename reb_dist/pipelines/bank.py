"""Which index holds a bank: one faiss index in process, or shards on Ray actors (bank.shards >= 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reb_dist.config import BankConfig
from reb_dist.core.ldknn import Index, IndexFactory


def shard_folder(bank: BankConfig, output_dir: str | Path, category: str) -> Path:
    """The folder of a category's banks: bank.shard_dir/<category>, else <output_dir>/bank_shards/<category>.

    Each bank's files go in a sub-folder of it named by the bank's fingerprint (written by the
    factory of `index_factory`, which knows the vectors), so two banks of one category (a full and
    a few-shot bank in one sweep) never share, or overwrite, each other's shard files.
    """
    return Path(bank.shard_dir or Path(output_dir) / "bank_shards") / category


def index_factory(bank: BankConfig, shard_dir: str | Path | None = None) -> IndexFactory | None:
    """The factory a detector should index its bank with.

    Args:
        bank: the bank settings; `bank.shards` >= 1 asks for that many Ray shard actors.
        shard_dir: the folder for shard files (needed when sharded).

    Returns:
        None for an in-process bank (the detector's default), else a factory that writes the bank's
        shard files to `shard_dir/<bank fingerprint>/` and opens a `ShardedBank` over them.
    """
    if bank.shards < 1:
        return None
    if not shard_dir:
        raise ValueError("a sharded bank needs a folder for its shard files (bank.shard_dir)")

    def sharded(vectors: np.ndarray) -> Index:
        from reb_dist.distributed.sharded_bank import ShardedBank

        # by fingerprint: distinct banks given one folder must not overwrite each other's files,
        # which a restarted actor would then load
        return ShardedBank.create(vectors, shard_dir, bank.shards, dtype=bank.dtype, by_fingerprint=True,
                                  neighbour_search=bank.neighbour_search, nprobe=bank.nprobe,
                                  query_search=bank.query_search,
                                  cpus_per_shard=bank.shard_cpus, gpus_per_shard=bank.shard_gpus)

    return sharded
