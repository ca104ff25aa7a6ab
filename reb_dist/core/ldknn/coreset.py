"""Greedy k-center coreset (PatchCore): keep the bank points that cover it best.

Distances are taken on a random projection to `projection_dim` dims (Johnson-Lindenstrauss), as
PatchCore does, to keep the O(n * m) loop cheap; the selected points keep their full features.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def greedy_coreset(bank: np.ndarray, ratio: float, projection_dim: int = 128, seed: int = 0,
                   progress: bool = False) -> np.ndarray:
    """Indices (sorted) of round(ratio * n) bank points chosen by greedy k-center."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    n = len(bank)
    m = max(1, int(round(ratio * n)))
    if m >= n:
        return np.arange(n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    if projection_dim and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / projection_dim ** 0.5
        x = x @ proj
    start = int(torch.randint(n, (1,), generator=gen))
    chosen = [start]
    min_dist = torch.linalg.vector_norm(x - x[start], dim=1)
    for _ in tqdm(range(m - 1), desc="coreset", disable=not progress, leave=False):
        nxt = int(torch.argmax(min_dist))
        chosen.append(nxt)
        torch.minimum(min_dist, torch.linalg.vector_norm(x - x[nxt], dim=1), out=min_dist)
    return np.sort(np.array(chosen, dtype=np.int64))
