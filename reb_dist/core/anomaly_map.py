"""From patch scores to image scores and pixel maps (pure torch, batched)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SCORE_REDUCTIONS = ("max", "pool3max")


def image_scores(patch_maps: np.ndarray, reduction: str = "max") -> np.ndarray:
    """Reduce (N, h, w) patch maps to (N,) image scores.

    "max" as the paper writes; "pool3max" as the authors' code does (max of a 3x3 average pool
    with stride 3, which damps single-patch spikes).

    Raises:
        ValueError: If `reduction` is not in `IMAGE_SCORE_REDUCTIONS`.
    """
    if reduction == "max":
        return patch_maps.reshape(len(patch_maps), -1).max(axis=1)
    if reduction == "pool3max":
        pooled = F.avg_pool2d(torch.from_numpy(patch_maps)[:, None], 3, stride=3)
        return pooled.flatten(1).max(dim=1).values.numpy()
    raise ValueError(f"image score must be one of {IMAGE_SCORE_REDUCTIONS}, not {reduction!r}")


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Return a normalised 1-D float32 Gaussian kernel of `sigma`, truncated at 4 sigma."""
    radius = int(4 * sigma + 0.5)  # as scipy / anomalib: truncate at 4 sigma
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def pixel_maps(patch_maps: np.ndarray, size: int | tuple[int, int], sigma: float = 4.0,
               batch_size: int = 32) -> np.ndarray:
    """Turn (N, h, w) patch scores into (N, H, W) float32 pixel maps: bilinear upsample, then Gaussian blur.

    Args:
        patch_maps: (N, h, w) patch scores.
        size: Output size, an int for square maps or (H, W).
        sigma: Gaussian blur sigma in pixels; 0 or less skips the blur.
        batch_size: Maps processed per torch call.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    kernel = gaussian_kernel1d(sigma) if sigma > 0 else None
    out = np.empty((len(patch_maps), *size), np.float32)
    for s in range(0, len(patch_maps), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(patch_maps[s:s + batch_size], np.float32))[:, None]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if kernel is not None:
            r = len(kernel) // 2
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1))
        out[s:s + batch_size] = x[:, 0].numpy()
    return out
