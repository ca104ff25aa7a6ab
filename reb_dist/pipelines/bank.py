"""Which index holds a bank: one faiss index in process, or shards on Ray actors (bank.shards >= 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reb_dist.config import BankConfig
from reb_dist.core.ldknn import Index, IndexFactory


def shard_folder(bank: BankConfig, output_dir: str | Path, category: str) -> Path:
    """Where a category's shard files go: bank.shard_dir/<category>, else <output_dir>/bank_shards/<category>."""
    return Path(bank.shard_dir or Path(output_dir) / "bank_shards") / category


def index_factory(bank: BankConfig, shard_dir: str | Path | None = None) -> IndexFactory | None:
    """The factory a detector should index its bank with.

    Args:
        bank: the bank settings; `bank.shards` >= 1 asks for that many Ray shard actors.
        shard_dir: the folder for shard files (needed when sharded).

    Returns:
        None for an in-process bank (the detector's default), else a factory that writes the bank's
        shard files to `shard_dir` and opens a `ShardedBank` over them.
    """
    if bank.shards < 1:
        return None
    if not shard_dir:
        raise ValueError("a sharded bank needs a folder for its shard files (bank.shard_dir)")

    def sharded(vectors: np.ndarray) -> Index:
        from reb_dist.distributed.sharded_bank import ShardedBank

        return ShardedBank.create(vectors, shard_dir, bank.shards, dtype=bank.dtype,
                                  neighbour_search=bank.neighbour_search, nprobe=bank.nprobe,
                                  query_search=bank.query_search,
                                  cpus_per_shard=bank.shard_cpus, gpus_per_shard=bank.shard_gpus)

    return sharded
