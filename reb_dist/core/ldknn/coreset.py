"""Coresets of a memory bank: keep the bank points that cover it best (k-center).

`greedy_coreset` is PatchCore's greedy k-center: distances on a random projection to
`projection_dim` dims (Johnson-Lindenstrauss), one pass over the bank per chosen point.
`fast_greedy_coreset` picks the same points (up to ties and float rounding) in far fewer passes:
each round it takes the points farthest from the coreset as candidates, runs the greedy exactly
among them while the pick provably stays the farthest point of the whole bank, then updates every
point's distance to all of the round's picks in one matrix product. `random_coreset` is the
baseline, `coverage_radius` the quality measure (the k-center objective), `coreset` the dispatcher.
"""

from __future__ import annotations

import numpy as np
import torch
from reb_dist.progress import progress_bar

CORESET_METHODS = ("fast", "greedy", "random")
_BLOCK = 16384  # bank rows per distance block (fast_greedy_coreset)
_RADIUS_BLOCK = 4096  # bank rows and chosen points per distance block (coverage_radius)


def _size(n: int, ratio: float) -> int:
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, int(round(ratio * n)))


def _project(bank: np.ndarray, projection_dim: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    if projection_dim and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / projection_dim ** 0.5
        x = x @ proj
    return x


def _projection_and_start(bank: np.ndarray, projection_dim: int, seed: int) -> tuple[torch.Tensor, int]:
    """The projected bank and the first centre, both from `seed` (shared so methods pick alike)."""
    gen = torch.Generator().manual_seed(seed)
    x = _project(bank, projection_dim, gen)
    return x, int(torch.randint(len(bank), (1,), generator=gen))


def greedy_coreset(bank: np.ndarray, ratio: float, projection_dim: int = 128, seed: int = 0,
                   progress: bool = False) -> np.ndarray:
    """PatchCore's greedy k-center, one pass over the bank per pick (the slow reference).

    Args:
        bank: (n, D) features.
        ratio: fraction of the bank to keep, in (0, 1]; at least one point is kept.
        projection_dim: distances are taken on a random projection to this many dims (0: none).
        seed: seeds the projection and the first point.
        progress: show a tqdm bar.

    Returns:
        Sorted indices of the round(ratio * n) chosen bank points.
    """
    n, m = len(bank), _size(len(bank), ratio)
    if m >= n:
        return np.arange(n)
    x, start = _projection_and_start(bank, projection_dim, seed)
    chosen = [start]
    min_dist = torch.linalg.vector_norm(x - x[start], dim=1)
    for _ in progress_bar(range(m - 1), desc="coreset", disable=not progress, leave=False):
        nxt = int(torch.argmax(min_dist))
        chosen.append(nxt)
        torch.minimum(min_dist, torch.linalg.vector_norm(x - x[nxt], dim=1), out=min_dist)
    return np.sort(np.array(chosen, dtype=np.int64))


def fast_greedy_coreset(bank: np.ndarray, ratio: float, projection_dim: int = 128, seed: int = 0,
                        progress: bool = False, candidates: int = 1024) -> np.ndarray:
    """Greedy k-center picking what `greedy_coreset` picks, many points per pass over the bank.

    Each round takes the `candidates` points farthest from the coreset; every other point is at
    most `bound` (the next-largest distance) from it, and new centres only lower that. The greedy
    then runs exactly among the candidates (their distances to each pick) for as long as its pick is
    >= `bound`, i.e. provably the farthest point of the whole bank, so the picks equal the serial
    greedy's up to ties and float rounding. One matrix product per row block then updates every
    point against all the round's picks. Same projection and first point as `greedy_coreset`.

    Args and returns as `greedy_coreset`, plus `candidates`: candidates per round (more: fewer,
    larger rounds; 1024 measured best).
    """
    n, m = len(bank), _size(len(bank), ratio)
    if m >= n:
        return np.arange(n)
    x, start = _projection_and_start(bank, projection_dim, seed)
    x = x - x.mean(0)  # same distances, smaller norms: less cancellation in |x|^2 + |c|^2 - 2 x.c
    x_sq = (x * x).sum(1)
    # squared distances pick the same points; -inf marks chosen points so none is picked twice
    min_d = torch.full((n,), torch.inf)
    new, chosen = torch.tensor([start]), [start]
    with progress_bar(total=m, desc="coreset", disable=not progress, leave=False) as bar:
        while True:
            c = x[new]
            c_sq = (c * c).sum(1)
            for lo in range(0, n, _BLOCK):  # min_d = min(min_d, |x - c|^2 over the new centres c)
                nearest = torch.addmm(c_sq[None, :], x[lo:lo + _BLOCK], c.T, alpha=-2).amin(1)
                block = min_d[lo:lo + _BLOCK]
                torch.minimum(block, nearest.add_(x_sq[lo:lo + _BLOCK]).clamp_(min=0), out=block)
            min_d[new] = -torch.inf
            bar.update(len(new))
            if len(chosen) >= m:
                break
            vals, idx = torch.topk(min_d, min(candidates + 1, n))
            bound = float(vals[candidates]) if len(vals) > candidates else -np.inf
            cand, local = idx[:candidates], vals[:candidates].numpy().copy()
            xc, xc_sq = x[cand].numpy(), x_sq[cand].numpy()
            picks = []
            while len(chosen) + len(picks) < m:  # the exact greedy among the candidates
                j = int(np.argmax(local))
                if local[j] < bound or local[j] == -np.inf:
                    break
                picks.append(j)
                np.minimum(local, np.maximum(xc_sq + xc_sq[j] - 2 * (xc @ xc[j]), 0), out=local)
                local[j] = -np.inf
            new = cand[picks]
            chosen.extend(new.tolist())
    return np.sort(np.array(chosen, dtype=np.int64))


def random_coreset(bank: np.ndarray, ratio: float, projection_dim: int = 128, seed: int = 0,
                   progress: bool = False) -> np.ndarray:
    """A uniform random subset: the baseline.

    Args:
        bank: (n, D) features.
        ratio: fraction of the bank to keep, in (0, 1]; at least one point is kept.
        projection_dim: ignored (the signature is the greedy ones').
        seed: seeds the draw.
        progress: ignored.

    Returns:
        Sorted indices of round(ratio * n) distinct bank points.
    """
    n = len(bank)
    m = _size(n, ratio)
    if m >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, m, replace=False)).astype(np.int64)


def coverage_radius(bank: np.ndarray, chosen_ids: np.ndarray, projection: np.ndarray | None = None) -> float:
    """The k-center objective: the largest distance from a bank point to its nearest chosen point.

    Nearest points are found blockwise with float32 matrix products, dropping a point once it is
    closer to a chosen point than the largest distance found so far; the survivors' distances are
    recomputed in float64 (x - c), so the result does not suffer from the products' cancellation.

    Args:
        bank: (n, D) features.
        chosen_ids: indices of the chosen bank points (at least one).
        projection: optional (D, d) matrix: measure in the projected space instead of the full one.

    Returns:
        The coverage radius (plain L2).
    """
    if len(chosen_ids) == 0:
        raise ValueError("no chosen points")
    x = np.asarray(bank, dtype=np.float32)
    if projection is not None:
        x = x @ np.asarray(projection, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(x - x.mean(0)))  # same distances, less cancellation
    x_sq = (x * x).sum(1)
    c = x[torch.as_tensor(np.asarray(chosen_ids, dtype=np.int64))]
    c_sq = (c * c).sum(1)
    radius, step = 0.0, _RADIUS_BLOCK
    for lo in range(0, len(x), step):
        rows = torch.arange(lo, min(lo + step, len(x)))
        best = torch.full((len(rows),), torch.inf)
        nearest = torch.zeros(len(rows), dtype=torch.int64)
        for clo in range(0, len(c), step):
            d, j = torch.addmm(c_sq[None, clo:clo + step], x[rows], c[clo:clo + step].T, alpha=-2).min(1)
            closer = d.add_(x_sq[rows]) < best
            best[closer], nearest[closer] = d[closer], j[closer] + clo
            keep = best >= 0.99 * radius ** 2  # the others cannot be the farthest (1% for rounding)
            rows, best, nearest = rows[keep], best[keep], nearest[keep]
            if not len(rows):
                break
        if len(rows):
            radius = max(radius, float(torch.linalg.vector_norm(x[rows].double() - c[nearest].double(), dim=1).max()))
    return radius


def select_coreset(bank: np.ndarray, ratio: float, method: str = "fast", projection_dim: int = 128, seed: int = 0,
            progress: bool = False) -> np.ndarray:
    """Sorted indices of a coreset of `bank`.

    Args:
        bank: (n, D) features.
        ratio: fraction of the bank to keep, in (0, 1]; at least one point is kept.
        method: fast (`fast_greedy_coreset`) | greedy (`greedy_coreset`) | random (`random_coreset`).
        projection_dim: the greedy methods' random projection (0: none).
        seed: seeds the projection and first point, or the random draw.
        progress: show a tqdm bar (greedy methods).
    """
    functions = {"fast": fast_greedy_coreset, "greedy": greedy_coreset, "random": random_coreset}
    if method not in functions:
        raise ValueError(f"unknown coreset method {method!r}; expected one of {CORESET_METHODS}")
    return functions[method](bank, ratio, projection_dim, seed, progress)
