"""The interface every memory-bank index offers: what scorers and bank statistics need.

Two implementations: `reb_dist.core.ldknn.BankIndex` (one faiss index in this process) and
`reb_dist.distributed.sharded_bank.ShardedBank` (one shard per Ray actor, merged by global
minimum). The detector is given one (or a factory for one) and never asks which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Index(Protocol):
    """Exact (re-ranked) nearest-neighbour search over a bank of (n, d) float vectors."""

    def __len__(self) -> int:
        """Number of bank points."""

    @property
    def dim(self) -> int:
        """Feature dimension d."""

    query_search: str  # how `search` finds candidates by default: "exact", "ivf" or "hnsw"

    def search(self, queries: np.ndarray, k: int, batch_size: int | None = None, progress: str | None = None,
               approximate: bool = False, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(dist2, ids), each (m, k): squared L2 distances of the K nearest bank points, nearest first.

        Candidates come from the index's `query_search`; approximate=True takes them as the density
        build does (`neighbour_search`), exact=True exactly whatever the settings. Approximate
        candidates are always re-ranked with exact distances.
        """

    def search_bank_points(self, point_ids: np.ndarray, k: int,
                           progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(dist2, ids), each (len(point_ids), k): the K nearest OTHER bank points of bank points."""

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of bank points by id (any shape of ids; a trailing d axis is added)."""

    def close(self) -> None:
        """Release what the index holds outside this process (actors); a no-op in process."""


# Builds the index of a bank: the detector calls it whenever its bank is set.
IndexFactory = Callable[[np.ndarray], Index]
