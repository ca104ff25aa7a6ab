"""Approximate candidate search for the bank's self-search (the O(n^2) density build).

Only the candidates are approximate: they are re-ranked with exact distances like the exact path's,
so a density is exact whenever its K neighbours were found, and a miss can only make it larger
(the true K nearest are the smallest). Recall against the exact search is what
bench/sharded_bank.py measures (docs/RESULTS.md section 3); test patches are always searched exactly.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

NEIGHBOUR_SEARCHES = ("auto", "exact", "ivf", "hnsw")
# Up to this many bank points `auto` stays exact: the exact density build runs at 72-91% of the
# machine's GEMM rate, an evaluation needs only the bank points test patches land next to (780k x
# 152 on 2 cores: 15-28 min), and IVF's recall at that size is 0.990-0.999, not 1. Above it, `auto`
# takes IVF with nprobe scaled to the list count. Measured in docs/RESULTS.md section 3.
EXACT_UP_TO = 1_000_000
# IVF lists visited per query when nprobe=0 (auto): a fixed fraction of the lists, since recall at a
# fixed nprobe falls as the bank (and so nlist = 4 sqrt(n)) grows. At 780k points (3,533 lists)
# nprobe 16 / 32 / 64 / 128 gave recall@9 0.969 / 0.990 / 0.9975 / 0.9994; 1/48 of the lists is 74.
NPROBE_FRACTION = 1 / 48


def resolve_neighbour_search(kind: str, bank_size: int) -> str:
    """Resolve "auto" to "exact" (up to `EXACT_UP_TO` points) or "ivf"; other kinds pass through.

    Returns:
        One of "exact", "ivf" or "hnsw".

    Raises:
        ValueError: If `kind` is not in `NEIGHBOUR_SEARCHES`.
    """
    if kind not in NEIGHBOUR_SEARCHES:
        raise ValueError(f"neighbour search must be one of {NEIGHBOUR_SEARCHES}, got {kind!r}")
    if kind == "auto":
        return "exact" if bank_size <= EXACT_UP_TO else "ivf"
    return kind


def ivf_lists(n: int) -> int:
    """Return the IVF list count for `n` points: about 4 sqrt(n), each list with at least ~39 points."""
    return int(max(1, min(4 * math.sqrt(n), n // 39)))


def scaled_nprobe(nlist: int) -> int:
    """Return the IVF lists to probe per query: `NPROBE_FRACTION` of `nlist`, at least 16."""
    return max(16, math.ceil(nlist * NPROBE_FRACTION))


def build_approximate(bank: np.ndarray, kind: str, *, nprobe: int = 0, hnsw_m: int = 32,
                      ef_search: int = 64, seed: int = 0, block: int = 131072) -> "faiss.Index":
    """Build an IVF-flat or HNSW-flat faiss index over `bank` (float32 or float16, added block by block).

    Args:
        bank: The (n, d) bank.
        kind: "ivf" or "hnsw".
        nprobe: IVF lists visited per query; 0 visits `scaled_nprobe(nlist)`.
        hnsw_m: HNSW neighbours per node.
        ef_search: HNSW search breadth.
        seed: Seeds the sample of points the IVF quantizer is trained on.
        block: Points converted to float32 and added per call.

    Returns:
        The trained and filled faiss index.

    Raises:
        ValueError: If `kind` is neither "ivf" nor "hnsw".
    """
    import faiss

    n, d = bank.shape
    if kind == "ivf":
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        rng = np.random.default_rng(seed)
        train = bank[np.sort(rng.choice(n, size=min(n, nlist * 64), replace=False))]
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        index.nprobe = min(nprobe or scaled_nprobe(nlist), nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"unknown approximate search {kind!r}; use ivf or hnsw")
    for s in range(0, n, block):
        index.add(np.ascontiguousarray(bank[s:s + block], dtype=np.float32))
    return index


def recall_at_k(exact_ids: np.ndarray, found_ids: np.ndarray) -> float:
    """Return the fraction of the exact K nearest (per row) that the approximate search also returned."""
    # not intersect1d(assume_unique=True): padded ids (-1) repeat, and would count as hits
    hits = sum(int(np.isin(a, b).sum()) for a, b in zip(exact_ids, found_ids))
    return hits / exact_ids.size


def query_recall(index, queries: np.ndarray, k: int, sample: int = 2000, seed: int = 0) -> float:
    """recall@K of an index's query search against exact search, on a seeded sample of queries.

    Args:
        index: any `Index`; its default `search` is what is measured.
        queries: (m, d) queries (e.g. every test patch).
        k: neighbours compared per query.
        sample: queries drawn (without replacement; all of them when there are fewer).
        seed: seeds the draw, so a rerun measures the same queries.

    Returns:
        The fraction of the exact K nearest that the index's search also returned (1.0 when exact).
    """
    rows = np.random.default_rng(seed).choice(len(queries), min(sample, len(queries)), replace=False)
    q = np.ascontiguousarray(queries[np.sort(rows)], dtype=np.float32)
    return recall_at_k(index.search(q, k, exact=True)[1], index.search(q, k)[1])
