"""Scoring LDKNN for many (K, alpha) from one neighbour search, to select them on a validation set.

LDKNN reads, for each patch, its nearest bank point and that point's density; the density for any
K <= K_max is the mean of the first K columns of the point's K_max nearest-neighbour distances. So
one test search (K = 1) and one bank self-search (K = K_max, only for the bank points patches land
next to) give the patch maps of every (K, alpha) by a gather and a subtraction. `NeighbourTable` is
that precomputed state: a few MB, put once in Ray's object store and shared by all trials. With
`query_k` > 1 it also keeps each patch's `query_k` nearest distances, so KNN maps (for the anomaly
map's own search) come from the same table. The formulas are `reb_dist.core.ldknn.formulas`, as
`BankScorer` scores them (the density here is averaged in float32, `BankStats`'s in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from reb_dist.core.ldknn.formulas import knn, ldknn, local_density, nn1
from reb_dist.core.metrics import aupro, pixel_auroc


@dataclass
class NeighbourTable:
    """The searches that give LDKNN maps for every K <= `k_max`; built by `neighbour_table`."""

    nn_dist2: np.ndarray  # (n, h, w) squared distance of each patch to its nearest bank point
    nn_row: np.ndarray  # (n, h, w) row of that bank point in bank_dist2
    bank_dist2: np.ndarray  # (u, K_max) squared distances of those u bank points to their K_max nearest others
    query_dist2: np.ndarray | None = None  # (n, h, w, query_k) squared distances to the nearest bank points

    @property
    def k_max(self) -> int:
        """Largest K the table was searched with."""
        return self.bank_dist2.shape[1]


def neighbour_table(index, features: np.ndarray, k_max: int, progress: str | None = None,
                    query_k: int = 1, stats=None) -> NeighbourTable:
    """Search (n, h, w, d) features against a bank index (in-process or sharded), once for all K <= k_max.

    Args:
        query_k: nearest bank points kept per patch; above 1, KNN maps up to that K can be made too.
        stats: the bank's `BankStats`, whose cache answers bank points another table already
            searched (validation and test patches land next to many of the same points); None:
            every nearest point is searched.

    Returns:
        A `NeighbourTable` of each patch's nearest bank point and those points' `k_max` nearest others.
    """
    n, h, w, d = features.shape
    dist2, ids = index.search(features.reshape(-1, d), max(1, query_k), progress=progress)
    points, rows = np.unique(ids[:, 0], return_inverse=True)
    if stats is not None:
        bank_dist2, _ = stats.neighbours(k_max, points, progress=progress)
    else:
        bank_dist2, _ = index.search_bank_points(points, k_max, progress=progress)
    return NeighbourTable(dist2[:, 0].reshape(n, h, w), rows.reshape(n, h, w).astype(np.int64), bank_dist2,
                          dist2.reshape(n, h, w, -1).astype(np.float32) if query_k > 1 else None)


def ldknn_maps(table: NeighbourTable, k: int, alpha: float, squared: bool = True) -> np.ndarray:
    """Return (n, h, w) LDKNN patch maps: dist(f, nn) - alpha * mean distance of nn to its K nearest.

    `squared` keeps faiss's squared distances; False takes their square roots.

    Raises:
        ValueError: If `k` is outside 1..`table.k_max`.
    """
    if not 1 <= k <= table.k_max:
        raise ValueError(f"K={k} is outside 1..{table.k_max}, the K the table was searched with")
    density = local_density(table.bank_dist2, k, squared)
    return ldknn(table.nn_dist2, density[table.nn_row], alpha, squared)


def knn_maps(table: NeighbourTable, k: int, squared: bool = True) -> np.ndarray:
    """Return (n, h, w) KNN patch maps: the mean distance of each patch to its K nearest bank points.

    Raises:
        ValueError: If the table keeps fewer than `k` neighbours per patch (see `neighbour_table`'s query_k).
    """
    kept = 1 if table.query_dist2 is None else table.query_dist2.shape[-1]
    if not 1 <= k <= kept:
        raise ValueError(f"K={k} is outside 1..{kept}, the neighbours the table keeps per patch")
    if table.query_dist2 is None:
        return nn1(table.nn_dist2, squared)
    return knn(table.query_dist2, k, squared)


def method_maps(table: NeighbourTable, method: str, k: int, alpha: float = 0.0, squared: bool = True) -> np.ndarray:
    """(n, h, w) patch maps of "ldknn" (K, alpha) or "knn" (K) from one table."""
    if method == "ldknn":
        return ldknn_maps(table, k, alpha, squared)
    if method == "knn":
        return knn_maps(table, k, squared)
    raise ValueError(f"maps from a neighbour table: method {method!r} is not ldknn or knn")


def patch_masks(masks: np.ndarray, h: int, w: int) -> np.ndarray:
    """Reduce (n, H, W) 0/1 pixel masks to (n, h, w) bool: a patch is anomalous if over half of it is.

    Raises:
        ValueError: If H, W are not multiples of h, w.
    """
    n, big_h, big_w = masks.shape
    if big_h % h or big_w % w:
        raise ValueError(f"masks of {big_h}x{big_w} do not tile into {h}x{w} patches")
    frac = masks.reshape(n, h, big_h // h, w, big_w // w).mean(axis=(2, 4))
    return frac > 0.5


def validation_objective(maps: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                         image_score) -> dict[str, float]:
    """Score validation maps: image AUROC, patch-level pixel AUROC (when masks are given) and the
    objective to maximise: image AUROC, with pixel AUROC as a tie-breaker only. AUROC moves in steps
    of 0.5 / (n_pos x n_neg) (a tie counts a half), so the pixel term is weighted 0.4 / (n_pos x
    n_neg): it orders settings of equal image AUROC and can never outweigh one image-level step.

    Args:
        maps: (n, h, w) patch maps.
        labels: (n,) 0/1 image labels.
        masks: (n, h, w) patch masks, or None.
        image_score: Callable mapping the maps to (n,) image scores.

    Returns:
        A dict with ``val_image_auroc``, ``objective`` and, when masks have an anomalous patch,
        ``val_pixel_auroc``.
    """
    image_auroc = float(roc_auc_score(labels, image_score(maps)))
    out = {"val_image_auroc": image_auroc, "objective": image_auroc}
    if masks is not None and masks.any():
        pixel = float(roc_auc_score(masks.ravel(), maps.ravel()))
        out["val_pixel_auroc"] = pixel
        n_pos = int((np.asarray(labels) == 1).sum())
        out["objective"] = image_auroc + tie_weight(n_pos, len(labels) - n_pos) * pixel
    return out


def tie_weight(n_pos: int, n_neg: int) -> float:
    """A weight for a [0, 1] tie-breaker that stays below the smallest step of an AUROC over
    n_pos x n_neg pairs (half a pair, for ties)."""
    return 0.4 / max(1, n_pos * n_neg)


def map_objective(pixel_maps: np.ndarray, pixel_masks: np.ndarray, keep: np.ndarray | None = None) -> dict[str, float]:
    """Score validation anomaly maps against their masks: pixel AUROC, AUPRO, and their mean (the
    map search's objective).

    Args:
        pixel_maps: (n, H, W) maps at mask resolution (upsampled and blurred as reported).
        pixel_masks: (n, H, W) 0/1 masks.
        keep: (n,) bool, the images to count (normal ones and anomalous ones that have a mask);
            None: all.

    Returns:
        ``val_map_pixel_auroc``, ``val_map_aupro`` and ``map_objective`` (nan when no anomalous pixel).
    """
    if keep is not None:
        pixel_maps, pixel_masks = pixel_maps[keep], pixel_masks[keep]
    masks = np.asarray(pixel_masks) > 0
    if not masks.any():
        nan = float("nan")
        return {"val_map_pixel_auroc": nan, "val_map_aupro": nan, "map_objective": nan}
    auroc, pro = pixel_auroc(masks, pixel_maps), aupro(masks, pixel_maps)
    return {"val_map_pixel_auroc": auroc, "val_map_aupro": pro, "map_objective": (auroc + pro) / 2}
