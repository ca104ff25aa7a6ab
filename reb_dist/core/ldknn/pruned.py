"""Exact K-nearest search that skips the parts of the bank which provably hold no answer.

Not an approximation: the K nearest it returns are the brute-force search's. The bank is clustered
with k-means and stored list by list; each point is assigned to its nearest centroid (in float64).
For a query q whose nearest centroid is c1, no point of list l lies closer to q than

- the bisector bound (|q - c_l|^2 - |q - c1|^2) / (2 |c_l - c1|): every point of l is nearer c_l
  than c1, so it lies beyond the hyperplane halfway between them, on the side away from q;
- the ball bound |q - c_l| - r_l, r_l the largest distance of a point of l from c_l.

A first pass over each query's `PROBE` nearest lists gives an upper bound T on its K-th nearest
squared distance. Every list whose bound exceeds sqrt(T) is skipped; in the others, every point
within T by a float32 matrix multiply (plus that multiply's worst-case rounding) is a candidate, and
the candidates are ranked by exact distances sum((q - b)^2), ties by id, as the faiss path re-ranks.

On pill's 273k-point bank a test patch's bounds leave about 4% of the bank to visit, and the
visits are matrix multiplies list by list: 9x quicker than brute force. On magnetic_tile's bank, whose
nearest distances are large against its lists, half of it (1.5x). Anomalous patches, far from every
list, visit more: the worst case is the brute-force work plus the bounds (docs/RESULTS.md section 12).

Pure numpy + torch (+ faiss's k-means to build): no Ray.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PROBE = 2  # nearest lists per query whose K nearest give the first upper bound
# Banks at least this large are searched with pruning; below it a brute-force multiply is as quick
# and needs no clustering.
PRUNE_FROM = 50_000
POINTS_PER_LIST = 512  # about sqrt(n) lists for pill-sized banks; more lists cost more bounds
KMEANS_ROUNDS = 10
KMEANS_SAMPLE_PER_LIST = 256
GATHER_BLOCK = 65_536  # candidates re-ranked per step: bounded memory


def list_count(n: int) -> int:
    """Lists for a bank of `n` points: about sqrt(n), each holding at least `POINTS_PER_LIST` on average."""
    return int(max(1, min(round(math.sqrt(n)), n // POINTS_PER_LIST)))


def gemm_tolerance(dim: int) -> float:
    """Relative worst-case error of |q|^2 + |b|^2 - 2 q.b in float32, with a 4x margin.

    A float32 dot product of `dim` terms errs by at most dim * 2^-24 of sum |q_i b_i| <= |q| |b|
    <= (|q|^2 + |b|^2) / 2; the norms err less. So a squared distance computed this way is within
    this fraction of |q|^2 + |b|^2 of the exact one.
    """
    return 4 * (dim + 2) * 2.0 ** -24


class PrunedExactSearch:
    """The exact K nearest bank points of queries, visiting only the lists the bounds cannot rule out.

    Args:
        bank: The (n, d) float32 bank. A list-ordered copy is kept; ids returned are rows of `bank`.
        seed: Seeds k-means (which lists there are changes the speed, never the answer).
        lists: Number of k-means lists; 0 chooses `list_count(n)`.
    """

    def __init__(self, bank: np.ndarray, seed: int = 0, lists: int = 0):
        import faiss

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        n, d = bank.shape
        nlist = lists or list_count(n)
        kmeans = faiss.Kmeans(d, nlist, niter=KMEANS_ROUNDS, seed=seed,
                              max_points_per_centroid=KMEANS_SAMPLE_PER_LIST)
        kmeans.train(bank)
        # float64 in torch (its thread setting holds): the bounds need each point in its nearest list
        centroids = torch.from_numpy(kmeans.centroids).double()
        centroid_norms = centroids.square().sum(1)
        assign = torch.empty(n, dtype=torch.int64)
        slack = 0.0  # float64 rounding of the assignment's |c|^2 - 2 b.c comparisons
        for s in range(0, n, GATHER_BLOCK):
            block = torch.from_numpy(bank[s:s + GATHER_BLOCK]).double()
            assign[s:s + GATHER_BLOCK] = torch.addmm(centroid_norms, block, centroids.T, alpha=-2).argmin(1)
            slack = max(slack, 1e-12 * float(block.square().sum(1).max() + centroid_norms.max()))
        order = torch.argsort(assign, stable=True)
        assign = assign[order]
        self.ids = order.numpy()  # list-ordered position -> bank row
        self.points = torch.from_numpy(bank[self.ids])
        self.point_norms = self.points.double().square().sum(1).float()
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(assign.numpy(), minlength=nlist))])
        radius = torch.zeros(nlist, dtype=torch.float64)
        for s in range(0, n, GATHER_BLOCK):
            lists = assign[s:s + GATHER_BLOCK]
            gap = (self.points[s:s + GATHER_BLOCK].double() - centroids[lists]).norm(dim=1)
            radius.scatter_reduce_(0, lists, gap, "amax")
        self.radius = radius * (1 + 1e-9) + 1e-9
        between = centroid_norms.unsqueeze(1) + centroid_norms - 2 * centroids @ centroids.T
        self.between = between.clamp_(min=0).sqrt_()  # |c_a - c_b|; 0 on the diagonal
        self.centroids, self.centroid_norms = centroids, centroid_norms
        self.slack = slack
        self.tolerance = gemm_tolerance(d)
        self.max_norm = float(self.point_norms.max())
        self.visited = 0.0  # share of the bank visited per query by the last search (for benchmarks)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nlist(self) -> int:
        return len(self.starts) - 1

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(dist2, ids)``, each (m, k): the exact K nearest bank points of each query, by exact
        squared distance then id; ids are rows of the bank given at construction."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        m, k = len(queries), min(k, len(self))
        if m == 0 or k == 0:
            return np.empty((m, k), np.float32), np.empty((m, k), np.int64)
        q = torch.from_numpy(queries)
        q_norms = q.double().square().sum(1)
        # (nlist, m) float64: |c|^2 + |q|^2 - 2 c.q, list-major so the visits come out list by list
        to_centroid = torch.addmm(self.centroid_norms.unsqueeze(1), self.centroids, q.double().T, alpha=-2)
        to_centroid = to_centroid.add_(q_norms).clamp_(min=0)
        # squared distances within this much of |q|^2 + |b|^2 may be misjudged by the float32 multiply
        margin = (q_norms + self.max_norm).numpy() * self.tolerance
        q_norms32 = q_norms.float().numpy()
        bound = self._upper_bound(q, q_norms32, to_centroid, k) + margin
        visit = self._lists_to_visit(to_centroid, bound, q_norms)
        self.visited = float((visit.double().sum(1) * torch.from_numpy(np.diff(self.starts))).sum()) / (m * len(self))
        query_of, position = self._candidates(q, q_norms32, visit, bound + margin)
        short = np.flatnonzero(~np.isfinite(bound))  # their nearest lists held fewer than K points
        if len(short):  # their candidates by a multiply over the whole bank, ranked as the others'
            spare = self._brute_force_candidates(q[short], k)
            query_of = np.concatenate([query_of, np.repeat(short, spare.shape[1])])
            position = np.concatenate([position, spare.ravel()])
        return self._nearest(queries, query_of, position, m, k)

    def _brute_force_candidates(self, q: torch.Tensor, k: int) -> np.ndarray:
        """(len(q), K + spare) list-ordered positions: the K nearest by a multiply over the whole bank
        (`torch_knn`), with spare candidates for `_nearest` to rank exactly."""
        from reb_dist.core.ldknn.torch_search import EXTRA_CANDIDATES, torch_knn

        return torch_knn(self.points, q, min(k + EXTRA_CANDIDATES, len(self)), norms=self.point_norms)[1]

    def _list_distances(self, q: torch.Tensor, q_norms: np.ndarray, rows: np.ndarray, lst: int) -> torch.Tensor:
        """float32 |q|^2 + |b|^2 - 2 q.b of the given query rows against the points of list `lst`."""
        a, b = self.starts[lst], self.starts[lst + 1]
        d = torch.addmm(self.point_norms[a:b].unsqueeze(0), q[rows], self.points[a:b].T, beta=1, alpha=-2)
        return d.add_(torch.from_numpy(q_norms[rows]).unsqueeze(1))

    def _upper_bound(self, q: torch.Tensor, q_norms: np.ndarray, to_centroid: torch.Tensor, k: int) -> np.ndarray:
        """(m,) float64: the K-th smallest multiply distance among each query's `PROBE` nearest lists
        (inf when they hold fewer than K points)."""
        m, probe = len(q), min(PROBE, self.nlist)
        near = torch.zeros(to_centroid.shape, dtype=torch.bool)
        near.scatter_(0, torch.topk(to_centroid, probe, dim=0, largest=False, sorted=False).indices, True)
        found = np.full((m, probe, k), np.inf, dtype=np.float32)
        filled = np.zeros(m, dtype=np.int64)  # near lists done per query: the next slot
        for lst, rows in self._by_list(near):
            d = self._list_distances(q, q_norms, rows, lst)
            kk = min(k, d.shape[1])
            found[rows, filled[rows], :kk] = torch.topk(d, kk, dim=1, largest=False, sorted=False).values.numpy()
            filled[rows] += 1
        return np.partition(found.reshape(m, -1), k - 1, axis=1)[:, k - 1].astype(np.float64)

    @staticmethod
    def _by_list(mask: torch.Tensor):
        """``(list, query rows)`` for each list with a True in the (nlist, m) `mask`, lists ascending."""
        lists, rows = (t.numpy() for t in torch.nonzero(mask, as_tuple=True))  # by list, then query
        bounds = np.concatenate([[0], np.cumsum(mask.sum(1).numpy())])
        for lst in np.flatnonzero(np.diff(bounds)):
            yield int(lst), rows[bounds[lst]:bounds[lst + 1]]

    def _lists_to_visit(self, to_centroid: torch.Tensor, bound: np.ndarray, q_norms: torch.Tensor) -> torch.Tensor:
        """(nlist, m) bool: the lists whose bisector and ball bounds leave room for a point within
        `bound` (every list where `bound` is infinite). Both bounds are compared squared-free of
        divisions: a zero gap between centroids (duplicates) keeps the list."""
        reach = torch.from_numpy(np.sqrt(bound) * (1 + 1e-9))
        nearest = to_centroid.argmin(0)
        nearest_d = to_centroid.gather(0, nearest.unsqueeze(0))
        slack = self.slack + 1e-12 * q_norms  # float64 rounding of the query's |q - c|^2
        # bisector: (|q-c_l|^2 - |q-c1|^2) / (2 |c_l - c1|) <= reach, times 2 |c_l - c1| >= 0
        bisector = (to_centroid - nearest_d - slack) <= self.between.index_select(1, nearest) * (2 * reach)
        # ball: |q - c_l| - r_l <= reach, both sides non-negative, squared
        ball = to_centroid <= (self.radius.unsqueeze(1) + reach).square()
        return bisector & ball

    def _candidates(self, q: torch.Tensor, q_norms: np.ndarray, visit: torch.Tensor,
                    limit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, list-ordered position) of every point of a visited list within `limit`."""
        visit &= torch.from_numpy(np.isfinite(limit))  # rows with no finite limit are searched apart
        limit_t = torch.from_numpy(limit.astype(np.float32))
        query_of, position = [], []
        for lst, r in self._by_list(visit):
            d = self._list_distances(q, q_norms, r, lst)
            hit_row, hit_col = torch.nonzero(d <= limit_t[r].unsqueeze(1), as_tuple=True)
            query_of.append(r[hit_row.numpy()])
            position.append(hit_col.numpy() + self.starts[lst])
        if not query_of:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(query_of), np.concatenate(position)

    def _nearest(self, queries: np.ndarray, query_of: np.ndarray, position: np.ndarray, m: int,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
        """The K nearest of each query among the candidates, by exact distance then bank id."""
        exact = np.empty(len(query_of), dtype=np.float32)
        points = self.points.numpy()
        for s in range(0, len(query_of), GATHER_BLOCK):
            diff = points[position[s:s + GATHER_BLOCK]] - queries[query_of[s:s + GATHER_BLOCK]]
            exact[s:s + GATHER_BLOCK] = np.einsum("ij,ij->i", diff, diff)
        ids = self.ids[position]
        order = np.lexsort((ids, exact, query_of))
        query_of, exact, ids = query_of[order], exact[order], ids[order]
        counts = np.bincount(query_of, minlength=m)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(len(query_of)) - first[query_of]
        keep = rank < k
        dist = np.full((m, k), np.inf, dtype=np.float32)
        out = np.full((m, k), -1, dtype=np.int64)
        dist[query_of[keep], rank[keep]] = exact[keep]
        out[query_of[keep], rank[keep]] = ids[keep]
        return dist, out
