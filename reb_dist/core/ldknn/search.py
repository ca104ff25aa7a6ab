"""Exact nearest-neighbour search on a memory bank with faiss (flat L2, squared distances).

`BankIndex` is the one in-process index. The sharded bank (reb_dist.distributed.sharded_bank: one
index per Ray actor, merged by global minimum) implements the same `Index` protocol
(reb_dist.core.ldknn.index), so scorers do not care which one they get. The pure helpers
below (`merge_nearest`, `drop_self`, `exact_rerank`) are shared by both, which is what makes a
sharded result equal to a single-index one.
"""

from __future__ import annotations

import numpy as np
from reb_dist.progress import progress_bar

from reb_dist.core.ldknn.approx import (CALIBRATION_SAMPLE, QUERY_CALIBRATION_MIN, RECALL_TARGET, build_approximate,
                                        calibrate_nprobe, recall_at_k, resolve_neighbour_search)
from reb_dist.core.ldknn import pruned

EXTRA_CANDIDATES = 8
SEARCH_BATCH = 16384  # queries per faiss call: bounded memory, visible progress
STORAGE_DTYPES = ("float32", "float16")
# float16 banks are searched block by block, each block upcast to float32 for faiss's BLAS kernel
FLOAT16_BLOCK = 131072


def as_float32(x: np.ndarray) -> np.ndarray:
    """Return `x` as a C-contiguous float32 array (no copy when it already is one)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_rerank(bank_rows: np.ndarray, queries: np.ndarray,
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recompute candidate distances as sum((q - b)^2) and sort them, ties by id.

    faiss computes |q|^2 + |b|^2 - 2 q.b with BLAS, which loses the small distances of close
    neighbours to cancellation (0.4% relative error seen on bottle), which can also swap near-equal
    neighbours, and depends on how queries are batched. Recomputed, a distance is the same whichever
    batch, shard or machine found it.

    Args:
        bank_rows: The (m, c, d) bank vectors of `ids`.
        queries: The (m, d) query vectors.
        ids: The (m, c) candidate ids; -1 (faiss padding) gets an infinite distance.

    Returns:
        ``(dist2, ids)``, each (m, c): exact squared distances, sorted by distance then id.
    """
    diff = bank_rows.astype(np.float32, copy=False) - queries[:, None, :]
    dist = np.einsum("qkd,qkd->qk", diff, diff)
    dist[ids < 0] = np.inf  # faiss pads with -1 when it finds fewer candidates than asked
    return _sort_rows(dist, ids)


def _sort_rows(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, dist), axis=1)  # by distance, then by id: deterministic ties
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def merge_nearest(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(dist2, global ids)`` results into the global K nearest.

    Returns:
        ``(dist2, ids)``, each (m, k): the K smallest distances over all parts, ties by id.
    """
    dist = np.concatenate([d for d, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    dist, ids = _sort_rows(dist, ids)
    return dist[:, :k], ids[:, :k]


def drop_self(dist: np.ndarray, ids: np.ndarray, point_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From the K+1 nearest bank points of bank points, the K nearest OTHER ones.

    Self is dropped by index, not by distance == 0 (float noise makes a point's distance to itself
    non-zero for many points). Where duplicates push a point's own id out of the K+1, the farthest
    is dropped instead.

    Args:
        dist: (m, k + 1) squared distances, nearest first.
        ids: (m, k + 1) ids of those neighbours.
        point_ids: The (m,) bank points that were searched for.
        k: Neighbours to keep.

    Returns:
        ``(dist2, ids)``, each (m, k).
    """
    is_self = ids == point_ids[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    first_self = is_self.argmax(axis=1)
    keep = np.ones_like(is_self)
    keep[np.arange(len(keep)), first_self] = False
    return dist[keep].reshape(-1, k), ids[keep].reshape(-1, k)


def check_self_search(k: int, bank_size: int) -> None:
    """A bank point's K nearest OTHER points exist only when K < the bank's size; else ValueError."""
    if k >= bank_size:
        raise ValueError(f"K={k} needs more than {k} bank points, the bank has {bank_size}")


def check_bank(bank: np.ndarray, dtype: str) -> np.ndarray:
    """Validate a memory bank and return it as a C-contiguous array of storage `dtype`.

    Raises:
        ValueError: If `dtype` is not in `STORAGE_DTYPES` or `bank` is not a non-empty (n, d) array.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"bank storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if bank.ndim != 2 or len(bank) == 0:
        raise ValueError(f"a memory bank must be a non-empty (n, d) array, got shape {bank.shape}")
    return np.ascontiguousarray(bank, dtype=np.dtype(dtype))


def exact_bank_neighbours(index, point_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dist2, ids)``, each (len(point_ids), k): the exact K nearest OTHER bank points of the given
    bank points, whatever the index's search settings (any `Index`: in process or sharded)."""
    dist, ids = index.search(index.vectors(point_ids), k + 1, exact=True)
    return drop_self(dist, ids, point_ids, k)


def self_search_recall(index, k: int, sample: int = CALIBRATION_SAMPLE, seed: int = 0) -> float:
    """recall@K of an index's bank self-search (the density build's) against exact, on seeded bank points.

    Works for any `Index` (in process or sharded): the approximate K nearest other points of the
    sample (`search_bank_points`) against the exact ones (`search(..., exact=True)` less self).
    """
    n = len(index)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False)).astype(np.int64)
    return recall_at_k(exact_bank_neighbours(index, rows, k)[1], index.search_bank_points(rows, k)[1])


class BankIndex:
    """An exact L2 index over `bank` (n, d). `search` returns exact SQUARED L2 distances, nearest first.

    dtype="float16" halves the memory a bank takes: vectors are stored in half precision and upcast
    block by block for the search, so the search still runs on faiss's float32 BLAS kernel.

    neighbour_search picks how `search_bank_points` (the density build) finds candidates, and
    query_search how `search` finds the candidates of test patches: "exact", "ivf", "hnsw", or
    "auto" (exact up to approx.EXACT_UP_TO points). Approximate candidates are always re-ranked with
    exact distances; an approximate index is built on first use, once per kind.

    Where test patches or densities are searched exactly, a float32 bank of at least
    pruned.PRUNE_FROM points on CPU is searched visiting only the k-means lists that bounds cannot
    rule out (`pruned.PrunedExactSearch`, built on first use): the same K nearest as brute force,
    8.5-9x quicker on pill's bank (docs/RESULTS.md section 12).

    Args:
        bank: The (n, d) memory bank.
        use_gpu: Put the float32 flat index on the GPU when faiss has one.
        dtype: Storage dtype, "float32" or "float16".
        neighbour_search: "exact", "ivf", "hnsw" or "auto" (the density build).
        nprobe: IVF lists probed per query; 0 calibrates it per K (`calibration`).
        query_search: "exact", "ivf", "hnsw" or "auto" (test patches).
        recall_target: recall@K a calibrated nprobe must reach on `CALIBRATION_SAMPLE` seeded bank
            points (their K nearest other points, exact vs IVF candidates).
        seed: seeds the IVF training sample and the calibration sample.
    """

    def __init__(self, bank: np.ndarray, use_gpu: bool = False, dtype: str = "float32",
                 neighbour_search: str = "auto", nprobe: int = 0, query_search: str = "auto",
                 recall_target: float = RECALL_TARGET, seed: int = 0):
        import faiss

        self.bank = check_bank(bank, dtype)
        self.dtype = dtype
        self.neighbour_search = resolve_neighbour_search(neighbour_search, len(self.bank))
        self.query_search = resolve_neighbour_search(query_search, len(self.bank))
        self.nprobe = nprobe
        self.recall_target = recall_target
        self.seed = seed
        # K -> (nprobe, recall@K on the calibration sample), filled as searches of each K run: of
        # the bank's own points (the density build), and of the last large set of test patches
        self.calibration: dict[int, tuple[int, float]] = {}
        self.query_calibration: dict[int, tuple[int, float]] = {}
        self._approximate: dict = {}  # kind -> faiss index, built on first use
        self.index = None  # faiss's flat index, for exact searches that are not pruned
        self._on_gpu = use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        self._pruned: pruned.PrunedExactSearch | None = None
        self.prunes = False
        # k-means costs seconds (5 s on pill's bank): worth it where exact searches are the work, not
        # for an approximate index's few exact ones (calibration samples, refined patches)
        heavy = "exact" in (self.query_search, self.neighbour_search)
        self.use_pruning(heavy and len(self.bank) >= pruned.PRUNE_FROM)

    def use_pruning(self, enabled: bool) -> None:
        """Search exactly with `pruned.PrunedExactSearch` (enabled; float32 banks on CPU only) or with
        faiss's flat index (brute force; built here if needed). Same answers; for comparisons."""
        import faiss

        self.prunes = enabled and self.dtype == "float32" and not self._on_gpu
        if self.dtype == "float32" and not self.prunes and self.index is None:
            index = faiss.IndexFlatL2(self.bank.shape[1])
            if self._on_gpu:
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            index.add(self.bank)
            self.index = index

    def __len__(self) -> int:
        return len(self.bank)

    def close(self) -> None:
        """Nothing to release: the index lives in this process (part of the `Index` protocol)."""

    @property
    def dim(self) -> int:
        """Dimension d of the bank vectors."""
        return self.bank.shape[1]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Return the float32 vectors of bank points by id, shaped ``ids.shape + (d,)``."""
        return self.bank[ids].astype(np.float32, copy=False)

    def search(self, queries: np.ndarray, k: int, batch_size: int | None = None, progress: str | None = None,
               approximate: bool = False, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Find the K nearest bank points of each query, batched so memory stays bounded and progress shows.

        Args:
            queries: Query vectors (m, d).
            k: Neighbours per query, capped at the bank's size.
            batch_size: Queries per faiss call; None uses `SEARCH_BATCH`.
            progress: Progress-bar label; None shows no bar.
            approximate: Candidates as the density build takes them (`neighbour_search`), not as
                test patches do (`query_search`).
            exact: Exact candidates whatever the settings (what recall is measured against).

        Returns:
            ``(dist2, ids)``, each (m, k): exact squared L2 distances, nearest first, and bank ids.
        """
        queries = as_float32(queries)
        batch_size = batch_size or SEARCH_BATCH
        k = min(k, len(self))
        # faiss ranks with rounding error; a few spare candidates, re-ranked exactly, make the
        # chosen K neighbours the true ones (and the same in any batch or shard)
        k_fetch = min(k + EXTRA_CANDIDATES, len(self))
        dist = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        kind = "exact" if exact else self.neighbour_search if approximate else self.query_search
        of_queries = not (exact or approximate)
        if kind == "ivf" and of_queries and not self.nprobe and len(queries) >= QUERY_CALIBRATION_MIN:
            self.calibrate_on_queries(queries, k, k_fetch)
        starts = range(0, len(queries), batch_size)
        for s in progress_bar(starts, desc=progress, disable=progress is None or len(starts) < 2, leave=False):
            q = queries[s:s + batch_size]
            if kind == "exact" and self.prunes:  # exact distances already, ranked as exact_rerank ranks
                dist[s:s + batch_size], ids[s:s + batch_size] = self.pruned_search().search(q, k)
                continue
            found = self._candidates(q, k_fetch, kind, k, of_queries)
            short = (found[:, :k] < 0).any(axis=1)
            if kind != "exact" and short.any():  # the visited lists held fewer than K points
                found[short] = self._candidates(q[short], k_fetch, "exact")
            d, i = exact_rerank(self.bank[found], q, found)
            dist[s:s + batch_size], ids[s:s + batch_size] = d[:, :k], i[:, :k]
        return dist, ids

    def pruned_search(self) -> pruned.PrunedExactSearch:
        """The bank's pruned exact search (k-means lists and their bounds), built on first use."""
        if self._pruned is None:
            self._pruned = pruned.PrunedExactSearch(self.bank, seed=self.seed)
        return self._pruned

    def approximate_index(self, kind: str):
        """The bank's faiss index of `kind` ("ivf" or "hnsw"), built on first use (so fit can time it)."""
        if kind not in self._approximate:
            self._approximate[kind] = build_approximate(self.bank, kind, nprobe=self.nprobe or 1, seed=self.seed)
        return self._approximate[kind]

    def calibrate_on_queries(self, queries: np.ndarray, k: int, k_fetch: int) -> tuple[int, float]:
        """Calibrate the test patches' nprobe for K on a seeded sample of `queries` themselves (their
        exact K nearest vs IVF candidates), keep it in `query_calibration[k]` and return it.

        The sample is drawn with seed + 1, so that `query_recall` (seeded with `seed`) measures the
        recall mostly on other queries than the ones the nprobe was chosen on."""
        rows = np.random.default_rng(self.seed + 1).choice(len(queries), min(CALIBRATION_SAMPLE, len(queries)),
                                                            replace=False)
        sample = as_float32(queries[np.sort(rows)])
        exact_ids = self.search(sample, k, exact=True)[1]
        self.query_calibration[k] = calibrate_nprobe(self.approximate_index("ivf"), sample, exact_ids, k_fetch,
                                                     self.recall_target)
        return self.query_calibration[k]

    def calibrated_nprobe(self, k: int, k_fetch: int, of_queries: bool = False) -> int:
        """IVF lists to probe for a K-nearest search fetching `k_fetch` candidates: `nprobe` when set,
        else the smallest nprobe that finds `recall_target` of the sample's K nearest other
        bank points (calibrated once per K; the result is kept in `calibration`). For test patches
        (`of_queries`), the last calibration on test patches of this K (`calibrate_on_queries`) wins."""
        if self.nprobe:
            return self.nprobe
        if of_queries and k in self.query_calibration:
            return self.query_calibration[k][0]
        if k not in self.calibration:
            n = len(self)
            rows = np.random.default_rng(self.seed).choice(n, min(CALIBRATION_SAMPLE, n), replace=False)
            rows = np.sort(rows).astype(np.int64)
            sample = self.vectors(rows)
            k_self = min(k + 1, n)  # the sample points are bank points: their own id comes first
            dist, ids = self.search(sample, k_self, exact=True)
            exact_ids = drop_self(dist, ids, rows, k_self - 1)[1]
            self.calibration[k] = calibrate_nprobe(self.approximate_index("ivf"), sample, exact_ids,
                                                   min(k_fetch + 1, n), self.recall_target)
        return self.calibration[k][0]

    def _candidates(self, queries: np.ndarray, k: int, kind: str, k_wanted: int | None = None,
                    of_queries: bool = False) -> np.ndarray:
        import faiss

        if kind != "exact":
            index = self.approximate_index(kind)
            if kind == "ivf":
                index.nprobe = self.calibrated_nprobe(k_wanted or k, k, of_queries)
            return index.search(queries, k)[1]
        if self.prunes:
            return self.pruned_search().search(queries, k)[1]
        if self.index is not None:
            return self.index.search(queries, k)[1]
        parts = []
        for s in range(0, len(self.bank), FLOAT16_BLOCK):
            block = self.bank[s:s + FLOAT16_BLOCK].astype(np.float32)
            d, i = faiss.knn(queries, block, min(k, len(block)))
            parts.append((d, i + s))
        return merge_nearest(parts, k)[1]

    def search_bank_points(self, point_ids: np.ndarray, k: int,
                           progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Find the K nearest OTHER bank points of the given bank points.

        Candidates come from the approximate index unless neighbour_search is "exact".

        Returns:
            ``(dist2, ids)``, each (len(point_ids), k), nearest first.

        Raises:
            ValueError: If `k` is not below the bank's size.
        """
        point_ids = np.asarray(point_ids, dtype=np.int64)
        check_self_search(k, len(self))
        dist, ids = self.search(self.vectors(point_ids), k + 1, progress=progress, approximate=True)
        return drop_self(dist, ids, point_ids, k)
