"""The patch-score formulas of the methods that read only neighbour distances, written once.

  ldknn  dist(f, m_nn) - alpha * density(m_nn)             (REB eq. 3, 4)
  knn    mean distance to the K nearest bank points
  nn1    distance to the nearest bank point
  kthnn  distance to the K-th nearest bank point
  density(m) = mean distance of bank point m to its K nearest other bank points (REB eq. 2)

Every path that scores them calls these: `BankScorer.score_neighbours` (one faiss search),
`reb_dist.core.ldknn.selection` (maps of many (K, alpha) from one neighbour table) and the exported
torch module (`reb_dist.export.module.ExportedDetector`). They take squared distances as a search
returns them, nearest first, and use only slicing, `mean(axis=)`, subtraction and a product with
a Python number, so they run on numpy arrays and on torch tensors alike (traced into TorchScript and
ONNX): pass `sqrt=torch.sqrt` for tensors. Each path keeps its own dtype: nothing here casts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from reb_dist.core.ldknn.methods import ScoringMethod

# the methods scored from neighbour distances (and, for ldknn, the nearest point's density) alone
NEIGHBOUR_METHODS = ("ldknn", "knn", "nn1", "kthnn")

Array = Any  # a numpy array or a torch tensor
Sqrt = Callable[[Array], Array]


def to_distance(dist2: Array, squared: bool, sqrt: Sqrt = np.sqrt) -> Array:
    """`dist2` as is when `squared`, else its square root (faiss gives squared L2; the authors'
    code uses it as is, the paper writes plain L2)."""
    return dist2 if squared else sqrt(dist2)


def local_density(neighbour_dist2: Array, k: int, squared: bool, sqrt: Sqrt = np.sqrt, dtype=None) -> Array:
    """(...,) density of bank points from (..., >= K) squared distances to their nearest other bank
    points: the mean distance to the first K. `dtype`: the mean's accumulator (numpy), None: the
    input's."""
    dist = to_distance(neighbour_dist2[..., :k], squared, sqrt)
    return dist.mean(axis=-1) if dtype is None else dist.mean(axis=-1, dtype=dtype)


def ldknn(nn_dist2: Array, density: Array, alpha: float, squared: bool, sqrt: Sqrt = np.sqrt) -> Array:
    """LDKNN: distance to the nearest bank point minus alpha times that point's density (the same
    shape as `nn_dist2`, its squared distance)."""
    return to_distance(nn_dist2, squared, sqrt) - alpha * density


def nn1(nn_dist2: Array, squared: bool, sqrt: Sqrt = np.sqrt) -> Array:
    """Distance to the nearest bank point, from its squared distance."""
    return to_distance(nn_dist2, squared, sqrt)


def knn(dist2: Array, k: int, squared: bool, sqrt: Sqrt = np.sqrt) -> Array:
    """Mean distance to the K nearest bank points, from (..., >= K) squared distances nearest first."""
    return to_distance(dist2[..., :k], squared, sqrt).mean(axis=-1)


def kthnn(dist2: Array, k: int, squared: bool, sqrt: Sqrt = np.sqrt) -> Array:
    """Distance to the K-th nearest bank point, from (..., >= K) squared distances nearest first."""
    return to_distance(dist2[..., :k], squared, sqrt)[..., -1]


def neighbour_scores(method: ScoringMethod, dist2: Array, density: Array | None = None,
                     sqrt: Sqrt = np.sqrt) -> Array:
    """(...,) scores of a method of NEIGHBOUR_METHODS (its own part: `method.map` is not read).

    Args:
        method: its name, K, alpha (ldknn) and squared.
        dist2: (..., >= K) squared distances to the nearest bank points, nearest first (ldknn and
            nn1 read the first column only).
        density: ldknn only: (...,) density of each query's nearest bank point, for `method.k`.
        sqrt: the square root for plain distances (`torch.sqrt` for tensors).

    Raises:
        ValueError: the method is not one of NEIGHBOUR_METHODS, or ldknn without a density.
    """
    name, k, squared = method.name, method.k, method.squared
    if name == "ldknn":
        if density is None:
            raise ValueError("ldknn needs the density of each query's nearest bank point")
        return ldknn(dist2[..., 0], density, method.alpha, squared, sqrt)
    if name == "nn1":
        return nn1(dist2[..., 0], squared, sqrt)
    if name == "knn":
        return knn(dist2, k, squared, sqrt)
    if name == "kthnn":
        return kthnn(dist2, k, squared, sqrt)
    raise ValueError(f"{name} is not scored from neighbour distances alone; those are: {', '.join(NEIGHBOUR_METHODS)}")
