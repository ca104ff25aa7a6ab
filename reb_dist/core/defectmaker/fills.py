"""Defect fills: what a synthetic defect looks like inside its shape.

Two distributions (paper section 3.1.1): random noise, which is easy to tell apart and teaches the
network colour/texture outliers, and cut-paste, a crop of another normal image of the same class,
which looks locally plausible and so makes the task harder. Every fill gets a light colour jitter
so neither fill can be recognised by an exact colour.

All arithmetic that reduces over pixels is done in integers, and resampling goes through PIL's
fixed-point 8-bit filters, so a fill is byte-identical for the same generator state on any machine.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

NOISE_MEAN_RANGE = (50, 190)  # per-channel mean of the noise, inclusive
NOISE_MAX_SPREAD = 45  # half-width of the uniform noise around the mean, drawn in [0, 45]
NOISE_SCALE_RANGE = (1.0, 8.0)  # the noise is drawn at 1/scale of the fill size, then resized up
JITTER_STRENGTH = 0.1


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Return uint8 HxWx3 from an HxW, HxWx1, HxWx3 or HxWx4 image (grey replicated, alpha dropped).

    Raises:
        TypeError: If the image is not uint8.
        ValueError: If its shape is none of those.
    """
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC (C in 1, 3, 4) image, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def luma_x1000(image: np.ndarray) -> np.ndarray:
    """Return the HxW ITU-R 601 luma times 1000 as int32 (exact integer arithmetic, no float sums)."""
    a = image.astype(np.int32)
    return 299 * a[..., 0] + 587 * a[..., 1] + 114 * a[..., 2]


def to_gray(image: np.ndarray) -> np.ndarray:
    """Return the image's luma replicated over three channels (uint8 HxWx3)."""
    g = ((luma_x1000(image) + 500) // 1000).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def is_gray(image: np.ndarray) -> bool:
    """True for single-channel input or RGB whose three channels are identical (a grey image read as RGB)."""
    a = np.asarray(image)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 1):
        return True
    return bool(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]))


def resize(image: np.ndarray, height: int, width: int, resample: int = Image.BICUBIC) -> np.ndarray:
    """Return a uint8 HxW or HxWx3 array resized with PIL (`image` itself when the size matches)."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def random_noise(rng: np.random.Generator, height: int, width: int,
                 mean_range: tuple[int, int] = NOISE_MEAN_RANGE, max_spread: int = NOISE_MAX_SPREAD,
                 scale_range: tuple[float, float] = NOISE_SCALE_RANGE) -> np.ndarray:
    """Draw uint8 HxWx3 noise: per-channel uniform ints in [mean-spread, mean+spread], coarse then resized.

    Means are drawn per channel in [50, 190], one spread in [0, 45]; drawing at 1/scale (scale U[1, 8])
    and resizing bilinearly gives grain sizes from single pixels to small patches.
    """
    mean = rng.integers(mean_range[0], mean_range[1] + 1, size=3)
    spread = int(rng.integers(0, max_spread + 1))
    scale = rng.uniform(scale_range[0], scale_range[1])
    lh, lw = max(1, int(round(height / scale))), max(1, int(round(width / scale)))
    low = rng.integers(mean - spread, mean + spread + 1, size=(lh, lw, 3))
    low = np.clip(low, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(resize(low, height, width, Image.BILINEAR))


def cut_paste(rng: np.random.Generator, source_image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Return a random HxW crop (uint8 HxWx3) of `source_image`, another normal image of the class.

    A source smaller than the crop is first resized up to cover it (bicubic), so any pair of images works.
    """
    src = as_rgb(source_image)
    sh, sw = src.shape[:2]
    if sh < height or sw < width:
        f = max(height / sh, width / sw)
        src = resize(src, max(height, int(np.ceil(sh * f))), max(width, int(np.ceil(sw * f))))
        sh, sw = src.shape[:2]
    y0 = int(rng.integers(0, sh - height + 1))
    x0 = int(rng.integers(0, sw - width + 1))
    return src[y0:y0 + height, x0:x0 + width].copy()


def jitter_factors(rng: np.random.Generator, strength: float = JITTER_STRENGTH) -> tuple[float, float, float]:
    """Draw (brightness, contrast, saturation) factors, each U[1 - strength, 1 + strength], in that order."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


_LEVELS = np.arange(256, dtype=np.float64)


def apply_jitter(image: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """Return uint8 HxWx3 `image` with brightness, contrast, then saturation `factors` applied.

    Follows torchvision's ColorJitter semantics.

    Brightness scales, contrast blends with the mean luma, saturation blends with each pixel's luma.
    Each step rounds back to uint8 (as torchvision does on uint8 tensors). The first two are 256-entry
    lookup tables, the mean luma comes from exact integer histograms, and saturation uses only correctly
    rounded float32 multiply/add, so the bytes do not depend on the machine or on summation order.
    """
    b, c, s = factors
    x = np.take(_to_uint8(_LEVELS * b), as_rgb(image))
    hist = np.asarray(Image.fromarray(x).histogram(), dtype=np.int64).reshape(3, 256)
    sums = [int(v) for v in hist @ np.arange(256, dtype=np.int64)]
    mean = float(299 * sums[0] + 587 * sums[1] + 114 * sums[2]) / (1000.0 * x.shape[0] * x.shape[1])
    x = np.take(_to_uint8(c * _LEVELS + (1.0 - c) * mean), x)
    if s == 1.0:
        return x
    xf = x.astype(np.float32)  # integers and integer sums below 2**24 are exact in float32
    gray = xf[..., 0] * np.float32(299) + xf[..., 1] * np.float32(587) + xf[..., 2] * np.float32(114)
    gray *= np.float32((1.0 - s) / 1000.0)
    xf *= np.float32(s)
    xf += gray[..., None]
    np.rint(xf, out=xf)
    np.clip(xf, 0, 255, out=xf)
    return xf.astype(np.uint8)


def color_jitter(rng: np.random.Generator, fill: np.ndarray, strength: float = JITTER_STRENGTH) -> np.ndarray:
    """Return `fill` with a light random brightness/contrast/saturation jitter (0.1 in REB), uint8 HxWx3.

    Hue is not jittered (the authors also jitter hue by 0.1): small hue shifts matter little for
    defects, and this keeps the fill path free of float colour-space conversions.
    """
    return apply_jitter(as_rgb(fill), jitter_factors(rng, strength))


FILLS = ("cut_paste", "noise")
