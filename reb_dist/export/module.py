"""One torch module that scores images end to end, for export to TorchScript or ONNX.

`ExportedDetector` holds what the in-process `Detector` spreads over a backbone, a faiss index, the
bank's densities and numpy post-processing: ImageNet normalisation, the feature extractor and its
aggregation, the bank, an exact nearest-neighbour search (matmul candidates re-ranked with
sum((q - b)^2), as `BankIndex.search` re-ranks faiss's), the patch scores of the image method and
of the map method (by `reb_dist.core.ldknn.formulas`, as in process), the image score, the blurred
pixel map, and the calibration's normalisation and threshold. Everything it reads is a buffer, and
every branch depends on settings fixed when it is built, so `torch.jit.trace` and
`torch.onnx.export` record one static graph with a free batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reb_dist.core.anomaly_map import gaussian_kernel1d
from reb_dist.core.features import ExportableFeatures, adaptive_pool_matrix  # noqa: F401 (re-exported)
from reb_dist.core.ldknn.formulas import NEIGHBOUR_METHODS, neighbour_scores
from reb_dist.core.ldknn.scorers import ScoringMethod
from reb_dist.export.runtime import OUTPUT_NAMES  # noqa: F401 (re-exported; defined where torch is not imported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# patch-score methods the module computes (with the formulas `BankScorer` uses); the others (lof,
# ldof, gde) need bank statistics or a Gaussian it does not carry
EXPORTABLE_METHODS = NEIGHBOUR_METHODS
# spare candidates re-ranked exactly, as reb_dist.core.ldknn.search.EXTRA_CANDIDATES
EXTRA_CANDIDATES = 8
# bank rows per distance matmul: bounds the (queries x rows) matrix (8 images: 8192 x 4096 floats)
BANK_CHUNK = 4096


@dataclass(frozen=True)
class Threshold:
    """The calibration as the module applies it (float32): low -> 0, threshold -> 0.5, high -> 1.

    `threshold` is the calibrated float64 threshold rounded UP to float32, so that for a float32
    score x, x >= threshold here exactly when x >= the float64 threshold in process.
    """

    threshold: float
    low: float
    high: float

    @classmethod
    def of(cls, threshold: float, low: float, high: float) -> Threshold:
        """From the calibration's float64 values."""
        t32 = np.float32(threshold)
        if float(t32) < threshold:
            t32 = np.nextafter(t32, np.float32(np.inf))
        return cls(float(t32), low, high)


class ExportedDetector(nn.Module):
    """uint8 images (B, S, S, 3) RGB -> (scores (B,), normalised_scores (B,), anomalous (B,) bool,
    maps (B, S, S)), as `Detector` + `predict` compute them for one method.

    Args:
        features: images normalised as ImageNet (B, 3, S, S) -> patch features (B, D, h, w)
            (an `ExportableFeatures`: backbone + aggregation).
        bank: the (n, D) float32 memory bank.
        image: the method of the image score (one of EXPORTABLE_METHODS, without a map method).
        map_method: the method of the anomaly map (the image method itself when coupled).
        densities: {K: (n,) float32 bank densities} for every ldknn method's K.
        image_score: "max" or "pool3max" (as `reb_dist.core.anomaly_map.image_scores`).
        sigma: Gaussian blur of the maps in pixels (0: none).
        image_size: S.
        threshold: the calibration; None: normalised scores are NaN and nothing is flagged.
        bank_chunk: bank rows per distance matmul.
    """

    def __init__(self, features: nn.Module, bank: np.ndarray, image: ScoringMethod, map_method: ScoringMethod,
                 densities: dict[int, np.ndarray], image_score: str, sigma: float, image_size: int,
                 threshold: Threshold | None = None, bank_chunk: int = BANK_CHUNK):
        super().__init__()
        for method in (image, map_method):
            if method.name not in EXPORTABLE_METHODS or method.map is not None:
                raise ValueError(f"the exported module scores one of {', '.join(EXPORTABLE_METHODS)} without a map "
                                 f"method of its own, not {method.label}")
        self.features = features
        self.image = image
        self.map_method = map_method
        self.image_score = image_score
        self.image_size = int(image_size)
        self.threshold = threshold
        self.bank_chunk = bank_chunk
        bank_t = torch.from_numpy(np.ascontiguousarray(bank, np.float32))
        self.register_buffer("bank", bank_t)
        self.register_buffer("bank_sq_norm", (bank_t.double() ** 2).sum(1).float())
        self.density_ks = sorted(densities)
        for k in self.density_ks:
            self.register_buffer(f"density_{k}", torch.from_numpy(np.asarray(densities[k], np.float32)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.blur_radius = 0
        if sigma > 0:
            kernel = gaussian_kernel1d(sigma)
            self.blur_radius = len(kernel) // 2
            self.register_buffer("kernel_w", kernel.view(1, 1, 1, -1))
            self.register_buffer("kernel_h", kernel.view(1, 1, -1, 1))
        n = len(bank_t)
        # every method reads the same candidates: the nearest K of either, plus spares, re-ranked exactly
        self.k_query = min(max(image.query_neighbours, map_method.query_neighbours), n)
        self.k_fetch = min(self.k_query + EXTRA_CANDIDATES, n)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score uint8 (or 0..255 float) RGB images (B, S, S, 3); see the class."""
        x = images.float().permute(0, 3, 1, 2) / 255.0
        feats = self.features((x - self.mean) / self.std)  # (B, D, h, w)
        _, d, h, w = feats.shape
        queries = feats.permute(0, 2, 3, 1).reshape(-1, d)
        dist2, ids = self.search(queries)
        image_patch = self.patch_scores(self.image, dist2, ids).reshape(-1, h, w)
        map_patch = image_patch if self.map_method == self.image else \
            self.patch_scores(self.map_method, dist2, ids).reshape(-1, h, w)
        scores = self.reduce(image_patch)
        maps = self.pixel_maps(map_patch)
        normalised, anomalous = self.calibrated(scores)
        return scores, normalised, anomalous, maps

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, k_query) exact squared distances and bank ids of each query's nearest bank points."""
        cand_d, cand_i = [], []
        for start in range(0, len(self.bank), self.bank_chunk):  # a static loop: the bank is fixed
            rows = self.bank[start:start + self.bank_chunk]
            # |b|^2 - 2 q.b ranks like |q - b|^2 (|q|^2 is the same for every row)
            approx = self.bank_sq_norm[start:start + self.bank_chunk] - 2.0 * queries @ rows.t()
            d, i = torch.topk(approx, min(self.k_fetch, len(rows)), dim=1, largest=False)
            cand_d.append(d)
            cand_i.append(i + start)
        if len(cand_d) > 1:
            pick = torch.topk(torch.cat(cand_d, 1), self.k_fetch, dim=1, largest=False).indices
            cand = torch.gather(torch.cat(cand_i, 1), 1, pick)
        else:
            cand = cand_i[0]
        vectors = self.bank[cand.reshape(-1)].reshape(cand.shape[0], cand.shape[1], -1)
        diff = vectors - queries.unsqueeze(1)
        exact = (diff * diff).sum(-1)  # as exact_rerank: no cancellation for close neighbours
        dist2, order = torch.topk(exact, self.k_query, dim=1, largest=False, sorted=True)
        return dist2, torch.gather(cand, 1, order)

    def patch_scores(self, method: ScoringMethod, dist2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(m,) patch scores of `method` from the search, by the formulas `BankScorer.score_neighbours` uses."""
        density = getattr(self, f"density_{method.k}")[ids[:, 0]] if method.name == "ldknn" else None
        return neighbour_scores(method, dist2, density, sqrt=torch.sqrt)

    def reduce(self, patch_maps: torch.Tensor) -> torch.Tensor:
        """(B, h, w) patch maps -> (B,) image scores (as `reb_dist.core.anomaly_map.image_scores`)."""
        if self.image_score == "pool3max":
            patch_maps = F.avg_pool2d(patch_maps.unsqueeze(1), 3, stride=3)
        return patch_maps.flatten(1).max(1).values

    def pixel_maps(self, patch_maps: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> (B, S, S): bilinear upsample, then the separable Gaussian blur with reflected
        borders (as `reb_dist.core.anomaly_map.pixel_maps`)."""
        x = F.interpolate(patch_maps.unsqueeze(1), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        if self.blur_radius:
            r = self.blur_radius
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), self.kernel_w)
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), self.kernel_h)
        return x[:, 0]

    def calibrated(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised scores and flags (as `reb_dist.core.thresholds.normalise`, in float32)."""
        if self.threshold is None:
            return torch.full_like(scores, float("nan")), torch.zeros_like(scores, dtype=torch.bool)
        t, low, high = self.threshold.threshold, self.threshold.low, self.threshold.high
        lo_span, hi_span = t - low, high - t
        below = 0.5 * (scores - low) / lo_span if lo_span > 0 else torch.zeros_like(scores)
        if hi_span > 0:
            above = 0.5 + 0.5 * (scores - t) / hi_span
        else:
            above = torch.where(scores > t, torch.ones_like(scores), torch.full_like(scores, 0.5))
        just_below = float(np.nextafter(np.float32(0.5), np.float32(0)))  # below t never rounds up to 0.5
        out = torch.where(scores < t, torch.clamp(below, max=just_below), above)
        return torch.clamp(out, 0.0, 1.0), scores >= t
