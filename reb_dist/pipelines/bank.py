"""Where a category's bank is indexed: one faiss index in this process, or shards on Ray actors.

The pipelines are Ray-free. A bank on Ray actors (bank.shards >= 1) comes from the Ray layer above
as a `BankPlacement` (category -> index factory) that the commands hand down
(`reb_dist.distributed.sharded_bank.sharded_placement`); the pipelines never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from reb_dist.config import BankConfig
from reb_dist.core.ldknn import IndexFactory
from reb_dist.errors import ConfigError

# category -> the factory its bank is indexed with (None: the detector's in-process default)
BankPlacement = Callable[[str], IndexFactory | None]


def shard_folder(bank: BankConfig, output_dir: str | Path, category: str) -> Path:
    """The folder of a category's banks: bank.shard_dir/<category>, else <output_dir>/bank_shards/<category>.

    Each bank's files go in a sub-folder of it named by the bank's fingerprint (written by the
    sharded factory, which knows the vectors), so two banks of one category (a full and a few-shot
    bank in one sweep) never share, or overwrite, each other's shard files.
    """
    return Path(bank.shard_dir or Path(output_dir) / "bank_shards") / category


def placed_index_factory(bank: BankConfig, category: str, placement: BankPlacement | None) -> IndexFactory | None:
    """The index factory of `category`'s bank: the placement's, else None (in process).

    Raises:
        ConfigError: the settings ask for Ray shard actors (bank.shards >= 1) but no placement was
            given: the Ray layer provides them (a `reb` command, reb_dist.commands, passes one).
    """
    if placement is not None:
        return placement(category)
    if bank.shards >= 1:
        raise ConfigError(f"bank.shards={bank.shards} holds the bank on Ray actors, which the Ray layer provides: "
                          "run it as a reb command (reb_dist.commands) or pass "
                          "placement=reb_dist.distributed.sharded_bank.sharded_placement(bank, output_dir)")
    return None
