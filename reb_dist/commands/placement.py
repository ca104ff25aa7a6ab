"""The bank's placement for a run, decided once at the edge: in process, or on Ray shard actors."""

from __future__ import annotations

from reb_dist.config import RunConfig
from reb_dist.pipelines.bank import BankPlacement


def bank_placement(cfg: RunConfig) -> BankPlacement | None:
    """None (each bank one index in this process) unless bank.shards >= 1: then the Ray layer's
    sharded placement, shard files under `shard_folder(cfg.bank, cfg.output_dir, category)`."""
    if cfg.bank.shards < 1:
        return None
    from reb_dist.distributed.sharded_bank import sharded_placement  # Ray only when shards are asked for

    return sharded_placement(cfg.bank, cfg.output_dir)
