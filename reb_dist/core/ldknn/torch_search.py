"""Exact nearest-neighbour search on a memory bank in torch: the GPU path, with no faiss.

`torch_knn` finds candidates with a blocked matrix multiply (|b|^2 - 2 q.b, blocked over queries
and bank so memory stays bounded) and `torch.topk`, merges them across bank blocks, and re-ranks
them with exact float32 distances sum((q - b)^2), ties by id: the same rule as the faiss path
(reb_dist.core.ldknn.search), so both return the same neighbours. `TorchIndex` holds a bank on a
torch device and offers the `Index` protocol (reb_dist.core.ldknn.index).

Pure torch + numpy: importing this module imports neither faiss nor search.py.
"""

from __future__ import annotations

import numpy as np
import torch

EXTRA_CANDIDATES = 8  # spare candidates re-ranked exactly, as search.py's
QUERY_BLOCK = 4096  # queries per matrix multiply
BANK_BLOCK = 65536  # bank points per matrix multiply: a 4096 x 65536 block is 1 GiB of float32
CPU_QUERY_BLOCK = 1024  # on CPU: a 256 MiB block, kinder to host memory
SEARCH_BATCH = 16384  # queries per `TorchIndex.search` step (the unit of progress)
STORAGE_DTYPES = ("float32", "float16")


def squared_norms(bank: torch.Tensor, block: int = BANK_BLOCK) -> torch.Tensor:
    """Return the float32 |b|^2 of each bank row, computed block by block (float16 rows upcast)."""
    return torch.cat([bank[s:s + block].float().square().sum(1) for s in range(0, len(bank), block)])


def _smallest(d: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the `k` smallest entries of each row of `d`, ties by lowest column.

    torch.topk breaks ties arbitrarily; rows where a tie straddles the k-th place (the k+1-th
    smallest equals the k-th) are redone so the lowest columns win, as faiss's heaps keep the first
    of equal distances.
    """
    if k >= d.shape[1]:
        return torch.arange(d.shape[1], device=d.device).expand(len(d), -1)
    values, cols = torch.topk(d, k + 1, dim=1, largest=False, sorted=True)
    cols = cols[:, :k].contiguous()
    tied = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
    if len(tied):
        sub, t = d[tied], values[tied, k - 1:k]
        below = sub < t
        equal = sub == t
        need = k - below.sum(dim=1, keepdim=True)
        chosen = below | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need))
        cols[tied] = chosen.nonzero()[:, 1].view(len(tied), k)  # row-major: k per row, in column order
    return cols


def _sort_by_distance_then_id(dist: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (distance, id): by id first, then stably by distance."""
    ids, order = torch.sort(ids, dim=1)
    dist = dist.gather(1, order)
    dist, order = torch.sort(dist, dim=1, stable=True)
    return dist, ids.gather(1, order)


def exact_rerank(bank: torch.Tensor, queries: torch.Tensor,
                 ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute candidate distances as sum((q - b)^2) in float32 and sort them, ties by id.

    Args:
        bank: The (n, d) bank (float32 or float16, upcast here).
        queries: The (m, d) float32 queries, on the bank's device.
        ids: The (m, c) candidate ids.

    Returns:
        ``(dist2, ids)``, each (m, c): exact squared distances, sorted by distance then id.
    """
    diff = bank[ids].float() - queries[:, None, :]
    return _sort_by_distance_then_id(diff.square().sum(dim=2), ids)


def _candidates(bank: torch.Tensor, norms: torch.Tensor, q: torch.Tensor, k: int,
                bank_block: int) -> torch.Tensor:
    """Ids of the `k` nearest bank points of queries `q` by |b|^2 - 2 q.b, merged over bank blocks.

    |q|^2 is left out: it does not change a query's ranking.
    """
    best_d = best_i = None
    for s in range(0, len(bank), bank_block):
        block = bank[s:s + bank_block].float()
        d = torch.addmm(norms[s:s + bank_block], q, block.T, alpha=-2.0)
        cols = _smallest(d, min(k, len(block)))
        cand_d, cand_i = _sort_by_distance_then_id(d.gather(1, cols), cols + s)
        if best_d is None:
            best_d, best_i = cand_d, cand_i
            continue
        # earlier blocks hold lower ids: a stable sort of [best, block] keeps (distance, id) order
        dist, order = torch.sort(torch.cat([best_d, cand_d], dim=1), dim=1, stable=True)
        best_d = dist[:, :k]
        best_i = torch.cat([best_i, cand_i], dim=1).gather(1, order[:, :k])
    return best_i


@torch.no_grad()
def torch_knn(bank: torch.Tensor, queries: torch.Tensor, k: int, extra: int = EXTRA_CANDIDATES,
              query_block: int | None = None, bank_block: int = BANK_BLOCK,
              norms: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Find the K nearest bank points of each query, exactly, on the bank's device.

    Candidates (K + `extra` per query) come from |b|^2 - 2 q.b, blocked over `query_block` queries
    and `bank_block` bank points; they are re-ranked with exact float32 distances, ties by id.

    Args:
        bank: The (n, d) bank, float32 or float16 (upcast block by block), on any device.
        queries: The (m, d) queries; moved to the bank's device block by block.
        k: Neighbours per query, capped at the bank's size.
        extra: Spare candidates re-ranked exactly.
        query_block: Queries per block; None: `QUERY_BLOCK` on a GPU, `CPU_QUERY_BLOCK` on CPU.
        bank_block: Bank points per block.
        norms: The bank's |b|^2 (`squared_norms`), when already computed.

    Returns:
        ``(dist2, ids)``: (m, k) float32 exact squared L2 distances, nearest first, and int64 bank ids.

    Raises:
        ValueError: If `k` < 1, the bank is empty or the dimensions differ.
    """
    n = len(bank)
    if k < 1 or n == 0 or queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"need K >= 1 (got {k}), a non-empty bank (got {tuple(bank.shape)}) and "
                         f"(m, {bank.shape[1]}) queries (got {tuple(queries.shape)})")
    if query_block is None:
        query_block = CPU_QUERY_BLOCK if bank.device.type == "cpu" else QUERY_BLOCK
    k = min(k, n)
    k_fetch = min(k + extra, n)
    if norms is None:
        norms = squared_norms(bank, bank_block)
    dist = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), query_block):
        q = queries[s:s + query_block].to(bank.device, torch.float32)
        found = _candidates(bank, norms, q, k_fetch, bank_block)
        d, i = exact_rerank(bank, q, found)
        dist[s:s + query_block] = d[:, :k].cpu().numpy()
        ids[s:s + query_block] = i[:, :k].cpu().numpy()
    return dist, ids


def drop_self(dist: np.ndarray, ids: np.ndarray, point_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From the K+1 nearest bank points of bank points, the K nearest OTHER ones (as search.py's).

    Self is dropped by id, not by distance 0; where duplicates push a point's own id out of the
    K+1, the farthest is dropped instead.

    Returns:
        ``(dist2, ids)``, each (m, k).
    """
    is_self = ids == point_ids[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = np.ones_like(is_self)
    keep[np.arange(len(keep)), is_self.argmax(axis=1)] = False
    return dist[keep].reshape(-1, k), ids[keep].reshape(-1, k)


class TorchIndex:
    """An exact L2 index over `bank` (n, d) held on a torch device; the `Index` protocol.

    `search` returns exact SQUARED L2 distances, nearest first, equal to `BankIndex`'s. There is no
    approximate index: every search is exact.

    Args:
        bank: The (n, d) memory bank.
        device: Where the bank is held and searched ("cuda", "cpu", a torch.device).
        dtype: Storage dtype, "float32" or "float16" (upcast to float32 block by block).
        query_block: Queries per matrix multiply; None picks one for the device.
        bank_block: Bank points per matrix multiply.

    Raises:
        ValueError: If `dtype` is unknown or `bank` is not a non-empty (n, d) array.
    """

    query_search = "exact"
    neighbour_search = "exact"

    def __init__(self, bank: np.ndarray, device: str | torch.device = "cuda", dtype: str = "float32",
                 query_block: int | None = None, bank_block: int = BANK_BLOCK):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"bank storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"a memory bank must be a non-empty (n, d) array, got shape {bank.shape}")
        self.bank = np.ascontiguousarray(bank, dtype=np.dtype(dtype))  # host copy: `vectors`, `len`
        self.dtype = dtype
        self.device = torch.device(device)
        self.query_block = query_block
        self.bank_block = bank_block
        self._bank: torch.Tensor | None = torch.from_numpy(self.bank).to(self.device)
        self._norms: torch.Tensor | None = squared_norms(self._bank, bank_block)

    def __len__(self) -> int:
        return len(self.bank)

    @property
    def dim(self) -> int:
        """Dimension d of the bank vectors."""
        return self.bank.shape[1]

    def close(self) -> None:
        """Release the device copy of the bank; `search` is an error afterwards."""
        self._bank = self._norms = None

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Return the float32 vectors of bank points by id, shaped ``ids.shape + (d,)``."""
        return self.bank[ids].astype(np.float32, copy=False)

    def _device_bank(self) -> torch.Tensor:
        if self._bank is None:
            raise RuntimeError("this TorchIndex is closed")
        return self._bank

    def _search(self, queries: torch.Tensor, k: int, batch_size: int | None,
                progress: str | None) -> tuple[np.ndarray, np.ndarray]:
        bank = self._device_bank()
        batch_size = batch_size or SEARCH_BATCH
        k = min(k, len(self))
        dist = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        starts = range(0, len(queries), batch_size)
        if progress is not None and len(starts) > 1:
            from reb_dist.progress import progress_bar  # only when a bar is asked for: the module stays torch + numpy

            starts = progress_bar(starts, desc=progress, leave=False)
        for s in starts:
            dist[s:s + batch_size], ids[s:s + batch_size] = torch_knn(
                bank, queries[s:s + batch_size], k, query_block=self.query_block, bank_block=self.bank_block,
                norms=self._norms)
        return dist, ids

    def search(self, queries: np.ndarray, k: int, batch_size: int | None = None, progress: str | None = None,
               approximate: bool = False, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Find the K nearest bank points of each query (always exactly).

        Args:
            queries: Query vectors (m, d).
            k: Neighbours per query, capped at the bank's size.
            batch_size: Queries per step; None uses `SEARCH_BATCH`.
            progress: Progress-bar label; None shows no bar.
            approximate: Ignored: there is no approximate index (part of the `Index` protocol).
            exact: Ignored: every search is exact (part of the `Index` protocol).

        Returns:
            ``(dist2, ids)``, each (m, k): exact squared L2 distances, nearest first, and bank ids.
        """
        queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        return self._search(queries, k, batch_size, progress)

    def search_bank_points(self, point_ids: np.ndarray, k: int,
                           progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Find the K nearest OTHER bank points of the given bank points.

        Returns:
            ``(dist2, ids)``, each (len(point_ids), k), nearest first.

        Raises:
            ValueError: If `k` is not below the bank's size.
        """
        point_ids = np.asarray(point_ids, dtype=np.int64)
        if k >= len(self):
            raise ValueError(f"K={k} needs more than {k} bank points, the bank has {len(self)}")
        bank = self._device_bank()
        queries = bank[torch.from_numpy(point_ids).to(self.device)].float()  # gathered where the bank is
        dist, ids = self._search(queries, k + 1, None, progress)
        return drop_self(dist, ids, point_ids, k)
