"""Exact nearest-neighbour search on a memory bank with faiss (flat L2, squared distances).

`BankIndex` is the one place that talks to faiss. The sharded bank of later layers (Ray actors, one
index each, merged by global minimum) offers the same `search` so scorers do not care which it is.
"""

from __future__ import annotations

import faiss
import numpy as np
from tqdm.auto import tqdm


EXTRA_CANDIDATES = 8


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class BankIndex:
    """A flat L2 index over `bank` (n, d). `search` returns exact SQUARED L2 distances, nearest first."""

    def __init__(self, bank: np.ndarray, use_gpu: bool = False):
        self.bank = as_float32(bank)
        if self.bank.ndim != 2 or len(self.bank) == 0:
            raise ValueError(f"a memory bank must be a non-empty (n, d) array, got shape {bank.shape}")
        index = faiss.IndexFlatL2(self.bank.shape[1])
        if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(self.bank)
        self.index = index

    def __len__(self) -> int:
        return len(self.bank)

    def search(self, queries: np.ndarray, k: int, batch_size: int = 16384,
               progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(dist2, ids), each (m, k). Batched so that memory stays bounded and progress shows."""
        queries = as_float32(queries)
        k = min(k, len(self))
        # faiss ranks with rounding error; a few spare candidates, re-ranked exactly, make the
        # chosen K neighbours the true ones (and the same in any batch or shard)
        k_fetch = min(k + EXTRA_CANDIDATES, len(self))
        dist = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        starts = range(0, len(queries), batch_size)
        for s in tqdm(starts, desc=progress, disable=progress is None or len(starts) < 2, leave=False):
            q = queries[s:s + batch_size]
            _, found = self.index.search(q, k_fetch)
            d, i = self._exact(q, found)
            dist[s:s + batch_size], ids[s:s + batch_size] = d[:, :k], i[:, :k]
        return dist, ids

    def _exact(self, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Recompute the found distances as sum((q - b)^2) and re-sort.

        faiss computes |q|^2 + |b|^2 - 2 q.b with BLAS, which loses the small distances of close
        neighbours to cancellation (0.4% relative error seen on bottle), which can also swap
        near-equal neighbours, and depends on how queries are batched. Recomputed, a distance is
        the same whichever batch, shard or machine found it.
        """
        diff = self.bank[ids] - queries[:, None, :]
        dist = np.einsum("qkd,qkd->qk", diff, diff)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)

    def search_bank_points(self, point_ids: np.ndarray, k: int,
                           progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """K nearest OTHER bank points of the given bank points: self excluded by index, not by
        distance == 0 (float noise makes a point's distance to itself non-zero for many points)."""
        point_ids = np.asarray(point_ids, dtype=np.int64)
        if k >= len(self):
            raise ValueError(f"K={k} needs more than {k} bank points, the bank has {len(self)}")
        dist, ids = self.search(self.bank[point_ids], k + 1, progress=progress)
        is_self = ids == point_ids[:, None]
        # Where duplicates push a point's own id out of the first k+1, drop the farthest instead.
        no_self = ~is_self.any(axis=1)
        is_self[no_self, -1] = True
        first_self = is_self.argmax(axis=1)
        keep = np.ones_like(is_self)
        keep[np.arange(len(keep)), first_self] = False
        return dist[keep].reshape(-1, k), ids[keep].reshape(-1, k)
