"""Defect fusing: how a fill is put into the image inside its shape.

Pasting leaves a sharp boundary, which a CNN can learn to spot instead of the defect itself; blending
through a softened mask (erode, then Gaussian blur) hides that boundary. DefectMaker uses both, blend
with probability 0.5 (paper section 3.1.1; METHOD-NOTES "DefectMaker"):
``out = m * w * fill + (1 - m * w) * image``, with m the (hard or softened) mask and w the fuse weight.

Both are exact where the mask is 0: ``alpha == 0`` gives back the image's own bytes, so a defect never
leaks outside its (slightly dilated, for blend) shape. The blur kernel is built with scalar ``math.exp``
and applied as fixed-order numpy multiply/adds, so soft masks are the same on every machine.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

ERODE_RADIUS = 1  # px at 256: the authors erode with a 3x3 ellipse ...
BLUR_SIGMA = 1.0  # ... and blur with a 3x3 Gaussian; we use sigma 1 px truncated at 2 px
BLUR_RADIUS = 2


def disk(radius: int) -> np.ndarray:
    """Return a bool (2r+1)x(2r+1) disc structuring element of radius r (radius 1 is the 3x3 cross)."""
    r = int(radius)
    yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
    return yy * yy + xx * xx <= r * r


def gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """Return normalised float64 Gaussian taps from -radius to radius (scalar exp: same on every machine)."""
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = sum(taps)
    return np.array([t / total for t in taps], dtype=np.float64)


def _correlate(a: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """1-D correlation along `axis` with zero padding, as separate numpy multiplies and adds in a fixed
    order (no fused multiply-add, no library inner loop): the same bytes on every CPU."""
    r = (len(taps) - 1) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    p = np.pad(a, pad)
    n = a.shape[axis]
    out = np.zeros_like(a)
    for j, t in enumerate(taps):
        out += float(t) * (p[j:j + n] if axis == 0 else p[:, j:j + n])
    return out


def soften(mask: np.ndarray, erode_radius: int = ERODE_RADIUS, blur_sigma: float = BLUR_SIGMA,
           blur_radius: int = BLUR_RADIUS) -> np.ndarray:
    """Return a soft float32 HxW mask in [0, 1]: the hard mask (> 0) eroded, then Gaussian-blurred.

    Eroding first pulls the soft edge back inside the shape. When erosion would wipe out most of a thin
    shape (a scar or clump piece: under a quarter survives) the hard mask is blurred as it is, so a
    blended defect never vanishes. The support is always within `blur_radius` px (Chebyshev) of the
    hard mask.
    """
    hard = np.asarray(mask) > 0
    soft = np.zeros(hard.shape, dtype=np.float32)
    rows, cols = np.flatnonzero(hard.any(axis=1)), np.flatnonzero(hard.any(axis=0))
    if rows.size == 0:
        return soft
    # work on the shape's window grown by the blur radius (+1 so erosion sees a zero frame): the same
    # result as on the whole image, for a fraction of the cost
    m = max(int(blur_radius), 0) + 1
    y0, y1 = max(0, int(rows[0]) - m), min(hard.shape[0], int(rows[-1]) + 1 + m)
    x0, x1 = max(0, int(cols[0]) - m), min(hard.shape[1], int(cols[-1]) + 1 + m)
    window = hard[y0:y1, x0:x1]
    base = window
    if erode_radius > 0:
        eroded = ndimage.binary_erosion(window, structure=disk(erode_radius), border_value=0)
        if 4 * int(eroded.sum()) >= int(window.sum()):
            base = eroded
    local = base.astype(np.float64)
    if blur_radius > 0 and blur_sigma > 0:
        k = gaussian_kernel(blur_sigma, blur_radius)
        local = _correlate(_correlate(local, k, axis=0), k, axis=1)
    soft[y0:y1, x0:x1] = np.clip(local, 0.0, 1.0)
    return soft


def composite(image: np.ndarray, fill: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Return alpha * fill + (1 - alpha) * image, rounded to uint8; pixels with alpha == 0 keep their bytes.

    Raises:
        ValueError: If `fill` differs in shape from `image`, or `alpha` from its HxW.
    """
    if image.shape != fill.shape:
        raise ValueError(f"fill shape {fill.shape} differs from image shape {image.shape}")
    if alpha.shape != image.shape[:2]:
        raise ValueError(f"mask shape {alpha.shape} differs from image size {image.shape[:2]}")
    alpha = np.asarray(alpha)
    out = image.copy()
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return out
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    a = alpha[box].astype(np.float64)
    a = a[..., None] if image.ndim == 3 else a
    # alpha == 0 gives 0 * fill + 1 * image exactly, so untouched pixels keep their bytes
    out[box] = np.clip(np.rint(a * fill[box] + (1.0 - a) * image[box]), 0, 255).astype(np.uint8)
    return out


def paste(image: np.ndarray, fill: np.ndarray, mask: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """Hard paste: return mask * w * fill + (1 - mask * w) * image (uint8); only masked pixels change.

    weight 1 is CutPaste's plain paste; Bezier-clump uses w ~ U(0.5, 1) for a half-transparent defect.
    """
    hard = (np.asarray(mask) > 0).astype(np.float64)
    return composite(image, fill, hard * float(weight))


def blend(rng: np.random.Generator, image: np.ndarray, fill: np.ndarray, mask: np.ndarray,
          weight_range: tuple[float, float] = (1.0, 1.0), erode_radius: int = ERODE_RADIUS,
          blur_sigma: float = BLUR_SIGMA, blur_radius: int = BLUR_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """Soft blend: return (uint8 image with the defect, float32 soft mask m).

    out = m * w * fill + (1 - m * w) * image.

    w ~ U(weight_range) is drawn from `rng` (one draw, even when the range is a single value, so the
    generator advances the same way whatever the range). METHOD-NOTES gives U(0.5, 1) for Bezier-clump;
    the authors' code uses w = 1 for the other Bezier shapes, which is the default here. Only pixels with
    m > 0 change, and those lie within `blur_radius` px of the hard mask.
    """
    w = float(rng.uniform(weight_range[0], weight_range[1]))
    soft = soften(mask, erode_radius, blur_sigma, blur_radius)
    return composite(image, fill, soft.astype(np.float64) * w), soft
