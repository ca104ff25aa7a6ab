"""GDE: one multivariate Gaussian fitted on a whole memory bank, scored by Mahalanobis distance.

The Gaussian density estimate REB compares LDKNN with (Tables 5-6), regularised as PaDiM does
(covariance + eps * I), but with one Gaussian per bank rather than one per patch position. The
fit accumulates mean and covariance in float64 chunk by chunk, merging each chunk's centred
statistics (Chan et al.'s pairwise update), so an (800k, 384) float32 bank is never copied whole
to float64 and a large common offset in the features does not cancel the covariance away.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

GDE_EPS = 0.01  # PaDiM's regularisation of the covariance
FIT_CHUNK = 16384  # bank rows made float64 at a time: 16384 x 384 x 8 B = 48 MiB
SCORE_CHUNK = 16384  # queries scored at a time


class GaussianDensity:
    """A Gaussian N(mean, covariance + eps * I) of bank vectors; scores are Mahalanobis distances.

    Build one with `fit` (an in-memory bank) or `fit_chunks` (a bank read piece by piece).

    Args:
        mean: (d,) mean of the bank.
        covariance: (d, d) unbiased sample covariance of the bank, before regularisation.
        count: Number of bank points the statistics were computed from.
        eps: Added to the covariance's diagonal so it is invertible (PaDiM uses 0.01).
    """

    def __init__(self, mean: np.ndarray, covariance: np.ndarray, count: int, eps: float = GDE_EPS):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.mean = np.asarray(mean, np.float64)
        self.covariance = np.asarray(covariance, np.float64)
        self.count = int(count)
        self.eps = float(eps)
        d = len(self.mean)
        if self.covariance.shape != (d, d):
            raise ValueError(f"covariance of shape {self.covariance.shape} for a mean of {d} dims")
        regularised = self.covariance + self.eps * np.eye(d)
        # Scores use the inverse Cholesky factor W = L^-1 (cov = L L^T): |W (x - mean)|^2 is the
        # squared Mahalanobis distance and, unlike (x-mu)^T P (x-mu), can never come out negative.
        chol = np.linalg.cholesky(regularised)
        self.whitening = np.linalg.solve(chol, np.eye(d))

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return len(self.mean)

    @property
    def precision(self) -> np.ndarray:
        """(d, d) inverse of the regularised covariance, W^T W."""
        return self.whitening.T @ self.whitening

    @classmethod
    def fit(cls, bank: np.ndarray, eps: float = GDE_EPS, chunk: int = FIT_CHUNK) -> GaussianDensity:
        """Fit on an (n, d) bank, `chunk` rows made float64 at a time.

        Args:
            bank: (n, d) bank vectors, any float dtype.
            eps: Diagonal regularisation of the covariance.
            chunk: Rows per float64 chunk.

        Returns:
            The fitted GaussianDensity.
        """
        bank = np.asarray(bank)
        if bank.ndim != 2:
            raise ValueError(f"a bank is (n, d), got shape {bank.shape}")
        return cls.fit_chunks((bank[s:s + chunk] for s in range(0, len(bank), chunk)), eps)

    @classmethod
    def fit_chunks(cls, chunks: Iterable[np.ndarray], eps: float = GDE_EPS) -> GaussianDensity:
        """Fit on a bank given as consecutive (rows, d) pieces, in one pass.

        Args:
            chunks: The bank's rows, piece by piece (each piece is made float64 on its own).
            eps: Diagonal regularisation of the covariance.

        Returns:
            The fitted GaussianDensity.

        Raises:
            ValueError: If there are no rows at all, or pieces of different widths.
        """
        n, mean, scatter = 0, None, None
        for piece in chunks:
            x = np.asarray(piece, np.float64)
            if x.ndim != 2:
                raise ValueError(f"bank pieces are (rows, d), got shape {x.shape}")
            if len(x) == 0:
                continue
            if mean is None:
                mean, scatter = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
            elif x.shape[1] != len(mean):
                raise ValueError(f"a bank piece of {x.shape[1]} dims after pieces of {len(mean)}")
            m = len(x)
            piece_mean = x.mean(axis=0)
            centred = x - piece_mean
            delta = piece_mean - mean
            total = n + m
            # merge two sets' centred scatter matrices exactly (no sum-of-squares cancellation)
            scatter += centred.T @ centred + np.outer(delta, delta) * (n * m / total)
            mean += delta * (m / total)
            n = total
        if mean is None:
            raise ValueError("cannot fit a Gaussian on an empty bank")
        # unbiased, as np.cov and PaDiM; one point leaves only the eps * I part
        return cls(mean, scatter / max(n - 1, 1), n, eps)

    def score(self, queries: np.ndarray, squared: bool = True, chunk: int = SCORE_CHUNK) -> np.ndarray:
        """Mahalanobis distance of each query from the bank's Gaussian.

        Args:
            queries: (m, d) query vectors.
            squared: Return the squared distance (as the other scorers' squared L2); False = its root.
            chunk: Queries made float64 and whitened at a time.

        Returns:
            (m,) float32 distances.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} for a Gaussian of {self.dim} dims")
        out = np.empty(len(queries), np.float32)
        for s in range(0, len(queries), chunk):
            z = (np.asarray(queries[s:s + chunk], np.float64) - self.mean) @ self.whitening.T
            out[s:s + chunk] = np.einsum("md,md->m", z, z)
        return out if squared else np.sqrt(out)
