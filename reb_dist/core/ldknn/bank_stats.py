"""Statistics of bank points from their K nearest OTHER bank points, computed on demand.

The self-search behind them is O(n^2) for the whole bank. An evaluation only needs them for bank
points some test patch lands next to, so every statistic here is filled lazily, per point, and
cached per K. `local_density` is REB eq. 2: the mean distance to the K nearest other bank points.
"""

from __future__ import annotations

import numpy as np

from reb_dist.core.ldknn.index import Index


def to_distance(dist2: np.ndarray, squared: bool) -> np.ndarray:
    """Return `dist2` as is when `squared`, else its square root.

    faiss gives squared L2; the authors' code uses it as is, the paper writes plain L2.
    """
    return dist2 if squared else np.sqrt(dist2)


class BankStats:
    """Lazily computed, per-K cached neighbour statistics of the points of a bank `index`."""

    def __init__(self, index: Index):
        self.index = index
        self._dist2: dict[int, np.ndarray] = {}  # K -> (n, K) squared distances, NaN = not computed
        self._ids: dict[int, np.ndarray] = {}
        self._density: dict[tuple[int, bool], np.ndarray] = {}

    def neighbours(self, k: int, point_ids: np.ndarray,
                   progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(dist2, ids)``, each (len(point_ids), k), of each point's K nearest other bank points.

        Only points not yet searched for this K are searched; results are cached. Points already
        searched with a larger K are answered from that search's first K columns, so densities for
        many K cost one search with the largest (`reb_dist.core.ldknn.selection` does the same).
        """
        point_ids = np.asarray(point_ids, dtype=np.int64)
        for wider in sorted(kk for kk in self._dist2 if kk > k):  # a K' > K search holds the K nearest first
            if not np.isnan(self._dist2[wider][point_ids, 0]).any():
                return self._dist2[wider][point_ids, :k], self._ids[wider][point_ids, :k]
        n = len(self.index)
        if k not in self._dist2:
            self._dist2[k] = np.full((n, k), np.nan, np.float32)
            self._ids[k] = np.full((n, k), -1, np.int64)
        dist2, ids = self._dist2[k], self._ids[k]
        point_ids = np.asarray(point_ids, dtype=np.int64)
        missing = np.unique(point_ids[np.isnan(dist2[point_ids, 0])])
        if len(missing):
            dist2[missing], ids[missing] = self.index.search_bank_points(missing, k, progress=progress)
        return dist2[point_ids], ids[point_ids]

    def preload_density(self, k: int, squared: bool, values: np.ndarray) -> None:
        """Set the densities for (`k`, `squared`) already known (read from a saved model).

        Args:
            k: K the densities were computed with.
            squared: Whether they are of squared distances.
            values: One density per bank point; NaN marks a point not computed.

        Raises:
            ValueError: If `values` does not have one entry per bank point.
        """
        if len(values) != len(self.index):
            raise ValueError(f"{len(values)} densities for a bank of {len(self.index)} points")
        self._density[(k, squared)] = np.asarray(values, dtype=np.float32).copy()

    def local_density(self, k: int, squared: bool, point_ids: np.ndarray | None = None,
                      progress: str | None = None) -> np.ndarray:
        """Return REB's local density of bank points: the mean distance to their K nearest other ones.

        Args:
            k: Neighbours averaged.
            squared: Use squared distances (as the authors' code does) instead of plain L2.
            point_ids: Bank points wanted; None means all of them.
            progress: Progress-bar label for the searches; None shows no bar.

        Returns:
            A float32 array with one density per entry of `point_ids`.
        """
        if point_ids is None:
            point_ids = np.arange(len(self.index))
        point_ids = np.asarray(point_ids, dtype=np.int64)
        values = self._density.setdefault((k, squared), np.full(len(self.index), np.nan, np.float32))
        missing = np.unique(point_ids[np.isnan(values[point_ids])])
        if len(missing):
            dist2, _ = self.neighbours(k, missing, progress=progress)
            values[missing] = to_distance(dist2, squared).mean(axis=1, dtype=np.float64)
        return values[point_ids]

    def k_distance(self, k: int, squared: bool, point_ids: np.ndarray) -> np.ndarray:
        """Return each point's distance to its K-th nearest other bank point (LOF's k-distance)."""
        return to_distance(self.neighbours(k, point_ids)[0][:, -1], squared)

    def local_reachability_density(self, k: int, squared: bool, point_ids: np.ndarray,
                                   progress: str | None = None) -> np.ndarray:
        """Return LOF's local reachability density of bank points o.

        lrd(o) = 1 / mean over neighbours p of max(k-distance(p), d(o, p)); one value per point.
        """
        dist2, nbr = self.neighbours(k, point_ids, progress=progress)
        reach = np.maximum(to_distance(dist2, squared),
                           self.k_distance(k, squared, nbr.ravel()).reshape(nbr.shape))
        return 1.0 / np.maximum(reach.mean(axis=1), 1e-12)
