"""Scoring LDKNN for many (K, alpha) from one neighbour search, to select them on a validation set.

LDKNN reads, for each patch, its nearest bank point and that point's density; the density for any
K <= K_max is the mean of the first K columns of the point's K_max nearest-neighbour distances. So
one test search (K = 1) and one bank self-search (K = K_max, only for the bank points patches land
next to) give the patch maps of every (K, alpha) by a gather and a subtraction. `NeighbourTable` is
that precomputed state: a few MB, put once in Ray's object store and shared by all trials.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from reb_dist.core.ldknn.bank_stats import to_distance


@dataclass
class NeighbourTable:
    """The searches that give LDKNN maps for every K <= `k_max`; built by `neighbour_table`."""

    nn_dist2: np.ndarray  # (n, h, w) squared distance of each patch to its nearest bank point
    nn_row: np.ndarray  # (n, h, w) row of that bank point in bank_dist2
    bank_dist2: np.ndarray  # (u, K_max) squared distances of those u bank points to their K_max nearest others

    @property
    def k_max(self) -> int:
        """Largest K the table was searched with."""
        return self.bank_dist2.shape[1]


def neighbour_table(index, features: np.ndarray, k_max: int, progress: str | None = None) -> NeighbourTable:
    """Search (n, h, w, d) features against a bank index (in-process or sharded), once for all K <= k_max.

    Returns:
        A `NeighbourTable` of each patch's nearest bank point and those points' `k_max` nearest others.
    """
    n, h, w, d = features.shape
    dist2, ids = index.search(features.reshape(-1, d), 1, progress=progress)
    points, rows = np.unique(ids[:, 0], return_inverse=True)
    bank_dist2, _ = index.search_bank_points(points, k_max, progress=progress)
    return NeighbourTable(dist2[:, 0].reshape(n, h, w), rows.reshape(n, h, w).astype(np.int64), bank_dist2)


def ldknn_maps(table: NeighbourTable, k: int, alpha: float, squared: bool = True) -> np.ndarray:
    """Return (n, h, w) LDKNN patch maps: dist(f, nn) - alpha * mean distance of nn to its K nearest.

    `squared` keeps faiss's squared distances; False takes their square roots.

    Raises:
        ValueError: If `k` is outside 1..`table.k_max`.
    """
    if not 1 <= k <= table.k_max:
        raise ValueError(f"K={k} is outside 1..{table.k_max}, the K the table was searched with")
    density = to_distance(table.bank_dist2[:, :k], squared).mean(axis=1)
    return to_distance(table.nn_dist2, squared) - alpha * density[table.nn_row]


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
    objective to maximise: image AUROC, with pixel AUROC as a tie-breaker (weighted 1e-3, below any
    image-level change).

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
        out["objective"] = image_auroc + 1e-3 * pixel
    return out
