"""Exact scores for the patches an image score reads: the faithful mode's last step.

An image score is the max of its patch map, so of an image's h*w patches only the hottest one
counts. A faithful (approximate) search finds most patches' nearest bank point and that point's
density exactly, but a missed neighbour shifts a patch's score; when that patch is the image's max,
the image score moves. Scoring each image's `top` hottest patches again with exact searches (their
nearest bank points over the whole bank, and those points' K nearest others for the density)
makes the image score the exact path's whenever its true argmax patch is among them, for
`2 * top` exact searches per image instead of h*w. `refine_table` does the same for a tune's
neighbour table, once for every (K, alpha) it will try.
"""

from __future__ import annotations

import numpy as np

from reb_dist.core.ldknn.formulas import NEIGHBOUR_METHODS, local_density, neighbour_scores
from reb_dist.core.ldknn.index import Index
from reb_dist.core.ldknn.methods import ScoringMethod
from reb_dist.core.ldknn.search import exact_bank_neighbours
from reb_dist.core.ldknn.selection import NeighbourTable, ldknn_maps

REFINE_TOP = 8  # patches per image scored again exactly (bank.refine_top)


def hottest_patches(patch_scores: np.ndarray, top: int) -> np.ndarray:
    """(n, top) column indices of each row's `top` highest scores of (n, p) `patch_scores`, any order."""
    top = min(top, patch_scores.shape[1])
    return np.argpartition(-patch_scores, top - 1, axis=1)[:, :top]


def _moved(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Where an exact search changed a value beyond float32 rounding."""
    return ~np.isclose(before, after, rtol=1e-5, atol=1e-6)


def refine_top_patches(index: Index, method: ScoringMethod, queries: np.ndarray, patch_scores: np.ndarray,
                       top: int = REFINE_TOP) -> tuple[np.ndarray, int]:
    """Score each image's `top` hottest patches again with exact searches (one method: see
    `refine_methods`).

    Returns:
        ``(scores, changed)``: a copy of `patch_scores` with the hottest patches' exact scores, and
        the number of those patches whose score changed (what the approximation had moved).
    """
    return refine_methods(index, [method], queries, [patch_scores], top)[0]


def refine_methods(index: Index, methods: list[ScoringMethod], queries: np.ndarray,
                   patch_scores: list[np.ndarray], top: int = REFINE_TOP) -> list[tuple[np.ndarray, int]]:
    """Score each image's `top` hottest patches of every method again, with one set of exact searches.

    The methods' hottest patches mostly coincide (an anomaly is hot under all of them), so the
    union is searched once: each patch's exact nearest bank points (as many as the widest method
    reads), and their nearest points' exact K nearest others for the largest LDKNN K, whose first K
    columns give every smaller K's density (prefix means, as `BankStats` takes them).

    Args:
        index: The bank's index (any `Index`: in process or sharded).
        methods: Methods of `NEIGHBOUR_METHODS` (their own parts: `method.map` is not read).
        queries: (n, p, d) patch features of n images.
        patch_scores: One (n, p) array per method: the patches' scores from the approximate search.
        top: Patches per image and method to score again.

    Returns:
        One ``(scores, changed)`` per method: a copy of its `patch_scores` with its hottest patches'
        exact scores, and how many of those patches' scores changed.

    Raises:
        ValueError: If a method is not scored from neighbour distances alone.
    """
    for method in methods:
        if method.name not in NEIGHBOUR_METHODS:
            raise ValueError(f"{method.name}: only {', '.join(NEIGHBOUR_METHODS)} are refined")
    n, p, d = queries.shape
    picked = [(np.arange(n)[:, None] * p + hottest_patches(s, top)).ravel() for s in patch_scores]
    union = np.unique(np.concatenate(picked))
    q = np.ascontiguousarray(queries.reshape(-1, d)[union], dtype=np.float32)
    dist2, ids = index.search(q, max(m.query_neighbours for m in methods), exact=True)
    density_ks = [m.k for m in methods if m.name == "ldknn"]
    if density_ks:
        points, where = np.unique(ids[:, 0], return_inverse=True)
        bank_dist2 = exact_bank_neighbours(index, points, max(density_ks))[0]
    out = []
    for method, flat, scores in zip(methods, picked, patch_scores):
        rows = np.searchsorted(union, flat)
        density = None
        if method.name == "ldknn":  # as BankStats.local_density: a float64 mean, stored as float32
            density = local_density(bank_dist2, method.k, method.squared, dtype=np.float64).astype(np.float32)
            density = density[where[rows]]
        exact = neighbour_scores(method, dist2[rows], density).astype(scores.dtype, copy=False)
        refined = scores.copy()
        before = refined.reshape(-1)[flat]
        refined.reshape(-1)[flat] = exact
        out.append((refined, int(np.count_nonzero(_moved(before, exact)))))
    return out


def refine_table(index: Index, features: np.ndarray, table: NeighbourTable, settings: list[tuple[int, float]],
                 top: int = REFINE_TOP, squared: bool = True,
                 refined: np.ndarray | None = None) -> tuple[NeighbourTable, int]:
    """A neighbour table whose hottest patches hold exact searches, for every (K, alpha) a tune tries.

    A tune reads one table for many (K, alpha), so the patches refined are the union, per image, of
    the `top` hottest under each of `settings` (corners of the search space: the hottest patches in
    between are nearly always among them). Each refined patch gets its exact nearest bank point(s)
    and that point's exact `k_max` nearest others, appended as new rows of `bank_dist2`.

    Args:
        index: The bank's index (in process or sharded: the table must be refined before it closes).
        features: (n, h, w, d) the table's patch features.
        table: Built by `neighbour_table` from `features` on `index`.
        settings: LDKNN (K, alpha) pairs whose hottest patches are refined.
        top: Hottest patches per image and setting.
        squared: Squared distances (as the tune scores them).
        refined: (n * h * w,) bool, the patches already exact in `table` (an earlier call's): they
            are not searched again, and the patches this call refines are set in it.

    Returns:
        ``(table, changed)``: the refined table (the input is left as it was), and how many refined
        patches had another nearest distance or nearest-point density at `k_max` than before.
    """
    n, h, w, d = features.shape
    picked = [np.arange(n)[:, None] * (h * w) + hottest_patches(ldknn_maps(table, k, a, squared).reshape(n, -1), top)
              for k, a in settings]
    flat = np.unique(np.concatenate([p.ravel() for p in picked]))
    if refined is not None:
        flat = flat[~refined[flat]]
        refined[flat] = True
    if not len(flat):
        return table, 0
    query_k = 1 if table.query_dist2 is None else table.query_dist2.shape[-1]
    dist2, ids = index.search(np.ascontiguousarray(features.reshape(-1, d)[flat], dtype=np.float32), query_k,
                              exact=True)
    points, where = np.unique(ids[:, 0], return_inverse=True)
    k_max = table.k_max
    bank_dist2 = exact_bank_neighbours(index, points, k_max)[0].astype(table.bank_dist2.dtype)
    before = (table.nn_dist2.reshape(-1)[flat],
              local_density(table.bank_dist2, k_max, squared)[table.nn_row.reshape(-1)[flat]])
    nn_dist2, nn_row = table.nn_dist2.copy(), table.nn_row.copy()
    nn_dist2.reshape(-1)[flat] = dist2[:, 0]
    nn_row.reshape(-1)[flat] = len(table.bank_dist2) + where
    query_dist2 = None
    if table.query_dist2 is not None:
        query_dist2 = table.query_dist2.copy()
        query_dist2.reshape(-1, query_k)[flat] = dist2
    after = (dist2[:, 0], local_density(bank_dist2, k_max, squared)[where])
    changed = _moved(before[0], after[0]) | _moved(before[1], after[1])
    return (NeighbourTable(nn_dist2, nn_row, np.concatenate([table.bank_dist2, bank_dist2]), query_dist2),
            int(changed.sum()))


def corner_settings(k_min: int, k_max: int, alpha_min: float, alpha_max: float) -> list[tuple[int, float]]:
    """(K, alpha) at the corners and middles of a tune's search box (K geometric): 9 settings."""
    ks = sorted({int(round(x)) for x in np.geomspace(max(k_min, 1), k_max, 3)})
    return [(k, float(a)) for k in ks for a in np.linspace(alpha_min, alpha_max, 3)]
