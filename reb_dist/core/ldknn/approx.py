"""Approximate candidate search over the whole bank: for the bank's self-search (the O(n^2) density
build) and for test patches.

Only the candidates are approximate: they are re-ranked with exact distances like the exact path's,
so a distance or density is exact whenever its K neighbours were found, and a miss can only make it
larger (the true K nearest are the smallest). IVF's nprobe is calibrated per K to a recall target
on a seeded sample of bank points (and, for a large set of test patches, on a sample of those
patches), and each run measures the recall it got (`query_recall`,
`self_search_recall`): the approximation is of the exact quantities, and it is measured.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

NEIGHBOUR_SEARCHES = ("auto", "exact", "ivf", "hnsw")
# Up to this many bank points `auto` stays exact (about 100 training images at 256 px: the shipped
# sample and few-shot banks), where the exact search costs seconds; above it, `auto` is IVF with an
# exact re-rank and nprobe calibrated to `RECALL_TARGET` (the "faithful" mode: the whole bank's
# nearest points and densities, approximately, with the recall measured). docs/RESULTS.md section 11.
EXACT_UP_TO = 100_000
# recall@K against exact search that a calibrated nprobe must reach on a seeded sample of bank points
RECALL_TARGET = 0.99
CALIBRATION_SAMPLE = 1000  # bank points whose exact K nearest other points the calibration compares with
# A search of at least this many test patches calibrates its own nprobe on a seeded sample of them
# (test patches, anomalous ones most, can lie farther from the bank's lists than bank points do:
# magnetic_tile's recall@1 was 0.944 under the bank points' nprobe); smaller ones (predict) reuse
# the last such calibration for the same K, else the bank points'.
QUERY_CALIBRATION_MIN = 20_000


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


def build_approximate(bank: np.ndarray, kind: str, *, nprobe: int = 1, hnsw_m: int = 32,
                      ef_search: int = 64, seed: int = 0, block: int = 131072) -> "faiss.Index":
    """Build an IVF-flat or HNSW-flat faiss index over `bank` (float32 or float16, added block by block).

    Args:
        bank: The (n, d) bank.
        kind: "ivf" or "hnsw".
        nprobe: IVF lists visited per query (the caller may change `index.nprobe` later).
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
        # 40 points per list and 10 k-means rounds: on pill's 273k-point bank 4x quicker to train
        # than faiss's defaults (64 x 25) at the same recall per nprobe (docs/RESULTS.md section 11)
        index.cp.niter = 10
        rng = np.random.default_rng(seed)
        train = bank[np.sort(rng.choice(n, size=min(n, nlist * 40), replace=False))]
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        index.nprobe = max(1, min(nprobe, nlist))
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


def query_recall(index, queries: np.ndarray, k: int, sample: int = 2000, seed: int = 0,
                 search_k: int | None = None) -> float:
    """recall@K of an index's query search against exact search, on a seeded sample of queries.

    Args:
        index: any `Index`; its default `search` is what is measured.
        queries: (m, d) queries (e.g. every test patch).
        k: neighbours compared per query.
        sample: queries drawn (without replacement; all of them when there are fewer).
        seed: seeds the draw, so a rerun measures the same queries.
        search_k: the K the measured search ran with, when it fetched more than `k` (its nprobe is
            calibrated for its own K): recall@k of the first `k` of a `search_k` search.

    Returns:
        The fraction of the exact K nearest that the index's search also returned (1.0 when exact).
    """
    rows = np.random.default_rng(seed).choice(len(queries), min(sample, len(queries)), replace=False)
    q = np.ascontiguousarray(queries[np.sort(rows)], dtype=np.float32)
    return recall_at_k(index.search(q, k, exact=True)[1], index.search(q, max(k, search_k or k))[1][:, :k])


def calibrate_nprobe(ivf, sample_queries: np.ndarray, exact_ids: np.ndarray, k_fetch: int,
                     target: float) -> tuple[int, float]:
    """The smallest nprobe whose candidates hold `target` of the sample's exact K nearest.

    nprobe doubles until the target is reached, then a bisection between the last two finds the
    smallest that reaches it: a power of two overshoots by up to 2x, and a search's cost grows with
    nprobe (magnetic_tile's test patches at K 9: 128 lists gave recall 0.998 where 70 gave the 0.99
    asked for, in about half the time; docs/RESULTS.md section 11). Recall only grows with nprobe:
    the lists visited are a superset, and a true neighbour among the candidates stays among the nearest.

    Args:
        ivf: a faiss IVF index; its nprobe is left as found.
        sample_queries: (m, d) float32 queries (bank points: a density search's own queries, and a
            stand-in for normal test patches, which lie among them).
        exact_ids: (m, K) ids of their exact K nearest (other) bank points.
        k_fetch: candidates fetched per query, as the search fetches them (K + spare + self).
        target: recall@K to reach, in (0, 1].

    Returns:
        ``(nprobe, recall)``: the chosen nprobe (every list when the target needs them all) and the
        recall@K it measured. Candidates are re-ranked exactly afterwards, so a true neighbour among
        the candidates is a true neighbour found.
    """
    before, nlist = ivf.nprobe, ivf.nlist

    def recall_at(nprobe: int) -> float:
        ivf.nprobe = nprobe
        return recall_at_k(exact_ids, ivf.search(sample_queries, k_fetch)[1])

    try:
        low, high = 0, 1  # low falls short of the target (0: no lists), high is the candidate
        recall = recall_at(high)
        while recall < target and high < nlist:
            low, high = high, min(2 * high, nlist)
            recall = recall_at(high)
        while high - low > 1:  # the smallest nprobe in (low, high] that reaches it
            middle = (low + high) // 2
            middle_recall = recall_at(middle)
            if middle_recall >= target:
                high, recall = middle, middle_recall
            else:
                low = middle
        return high, recall
    finally:
        ivf.nprobe = before
