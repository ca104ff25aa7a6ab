"""Patch scores on one memory bank: LDKNN and the baselines it is compared with (REB Tables 5-6).

The KNN-family methods score a test patch from its nearest bank points; one faiss search with the
largest K any of them needs serves them all, so a benchmark of six methods costs one search. GDE
reads no neighbours: it scores the patch itself against one Gaussian of the whole bank. The
formulas of ldknn, knn, nn1 and kthnn are `reb_dist.core.ldknn.formulas`, shared with the
selection's neighbour tables and the exported module.

  ldknn  dist(f, m_nn) - alpha * density(m_nn)              (REB eq. 3, 4)
  knn    mean distance to the K nearest bank points         (vanilla KNN)
  nn1    distance to the nearest bank point                 (PatchCore without reweighting)
  kthnn  distance to the K-th nearest bank point
  lof    local outlier factor of the patch w.r.t. the bank
  ldof   mean distance to the K nearest / their mean pairwise distance
  gde    Mahalanobis distance to one Gaussian of the bank  (PaDiM-style, covariance + eps * I)
"""

from __future__ import annotations

import numpy as np

from reb_dist.core.ldknn.bank_stats import BankStats
from reb_dist.core.ldknn.formulas import NEIGHBOUR_METHODS, neighbour_scores, to_distance
from reb_dist.core.ldknn.gaussian import FIT_CHUNK, GDE_EPS, GaussianDensity
from reb_dist.core.ldknn.index import Index
from reb_dist.core.ldknn.methods import METHODS, ScoringMethod, parse_method  # noqa: F401 (re-exported)

class BankScorer:
    """Scores query patches against one bank (its index, lazily computed bank statistics, and the
    bank's Gaussian for gde, fitted on first use with covariance regularisation `gde_eps`)."""

    def __init__(self, index: Index, stats: BankStats | None = None, gde_eps: float = GDE_EPS):
        self.index = index
        self.stats = stats or BankStats(index)
        self.gde_eps = gde_eps
        self._gaussian: GaussianDensity | None = None

    def gaussian(self) -> GaussianDensity:
        """The bank's Gaussian (gde), fitted once from the index's vectors and cached.

        Read through `Index.vectors` a chunk of ids at a time, so it works for any index (a sharded
        bank fetches each chunk from its actors) and the bank is never held whole in float64.
        """
        if self._gaussian is None:
            n = len(self.index)
            chunks = (self.index.vectors(np.arange(s, min(s + FIT_CHUNK, n), dtype=np.int64))
                      for s in range(0, n, FIT_CHUNK))
            self._gaussian = GaussianDensity.fit_chunks(chunks, self.gde_eps)
        return self._gaussian

    def score(self, methods: list[ScoringMethod], queries: np.ndarray,
              progress: bool = False) -> dict[ScoringMethod, np.ndarray]:
        """{method: (m,) scores} for (m, d) queries, from one search (none if only gde is asked)."""
        if any(m.needs_search for m in methods):
            k_max = max(m.query_neighbours for m in methods)
            dist2, ids = self.index.search(queries, k_max, progress="bank search" if progress else None)
        else:
            dist2, ids = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        return {m: self.score_neighbours(m, dist2, ids, progress, queries=queries) for m in methods}

    def score_neighbours(self, method: ScoringMethod, dist2: np.ndarray, ids: np.ndarray,
                         progress: bool = False, queries: np.ndarray | None = None) -> np.ndarray:
        """Scores from a search already done (dist2/ids nearest first, at least K columns).

        gde ignores dist2/ids and needs the (m, d) `queries` themselves; the others ignore `queries`.
        """
        k, sq = method.k, method.squared
        label = f"bank density K={k}" if progress else None
        if method.name == "gde":
            if queries is None:
                raise ValueError("gde scores the query vectors themselves: pass queries= to score_neighbours")
            return self.gaussian().score(queries, sq)
        if method.name in NEIGHBOUR_METHODS:
            density = self.stats.local_density(k, sq, ids[:, 0], progress=label) if method.name == "ldknn" else None
            return neighbour_scores(method, dist2, density)
        d = to_distance(dist2[:, :k], sq)
        if method.name == "lof":
            nbr = ids[:, :k]
            lrd_nbr = self.stats.local_reachability_density(k, sq, nbr.ravel(), progress=label)
            kdist = self.stats.k_distance(k, sq, nbr.ravel()).reshape(nbr.shape)
            lrd_query = 1.0 / np.maximum(np.maximum(d, kdist).mean(axis=1), 1e-12)
            return lrd_nbr.reshape(nbr.shape).mean(axis=1) / lrd_query
        if method.name == "ldof":
            inner = self._mean_pairwise(ids[:, :k], sq)
            return d.mean(axis=1) / np.maximum(inner, 1e-12)
        raise AssertionError(method.name)

    def _mean_pairwise(self, nbr: np.ndarray, squared: bool, chunk: int = 4096,
                       max_elements: int = 1 << 23) -> np.ndarray:
        """Mean distance between the K neighbours of each query, over the K*(K-1)/2 pairs (the same
        mean as over the ordered pairs). From the differences themselves, not |a|^2+|b|^2-2ab, which
        cancels in float32 when the features' norms are large next to their distances; the
        (rows, pairs, d) differences are made `max_elements` at a time."""
        k = nbr.shape[1]
        out = np.zeros(len(nbr), np.float32)
        if k < 2:
            return out
        first, second = np.triu_indices(k, 1)
        for s in range(0, len(nbr), chunk):
            v = np.asarray(self.index.vectors(nbr[s:s + chunk]), np.float32)  # (c, K, d)
            step = max(1, max_elements // (len(first) * v.shape[-1]))
            for r in range(0, len(v), step):
                end = min(r + step, len(v))  # the chunk's last step may be short (step need not divide it)
                diff = v[r:end, first] - v[r:end, second]  # (rows, pairs, d)
                d2 = np.einsum("cpd,cpd->cp", diff, diff)
                out[s + r:s + end] = to_distance(d2, squared).mean(axis=1)
        return out
