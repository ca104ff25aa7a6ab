"""Where defects may be centred: on the object, not on the empty background around it.

A synthetic defect on the plain background of an object image teaches the network nothing about the
object, and real defects of object classes are on the object. The authors centred defects on salient
pixels from precomputed EDN saliency maps for object classes and used the whole image for textures
(METHOD-NOTES "DefectMaker"). EDN's weights are not available here, so this module offers, in order
of preference:

1. precomputed maps from a folder (``load_saliency_folder``), e.g. exported from any saliency model;
2. an unsupervised estimate needing no weights (``spectral_residual_saliency``): Hou & Zhang's (2007)
   spectral residual combined with a colour-contrast-to-border term. Spectral residual alone marks the
   object's *edges* and leaves a uniform object interior (the dark mouth of an MVTec bottle) at zero;
   the border-contrast term marks everything that differs in colour from the image frame, which for
   object-on-plain-background images is the object itself;
3. the whole image (``mode="whole"``): for textures, and whenever the salient region is too small to
   be trusted.

Maps are quantised to 8 bits so that tiny float differences between machines (FFT, resampling) cannot
move a pixel across the threshold in practice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from reb_dist.core.defectmaker.fills import as_rgb, luma_x1000

WORK_SIZE = 64  # the spectral residual works on a 64x64 grey image, as in Hou & Zhang
SR_BLUR_SIGMA = 3.0  # smoothing of the residual map, px at 64
CONTRAST_BLUR_SIGMA = 2.0
BORDER_WIDTH = 3  # px at 64: the frame whose median colour is taken as "background"
CONTRAST_WEIGHT = 0.6  # share of the border-contrast term in the combined map
DEFAULT_THRESHOLD = 0.3
MIN_REGION_FRACTION = 0.02  # a salient region smaller than this is not trusted: use the whole image
MAP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy")


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi - lo <= 1e-12 else (a - lo) / (hi - lo)


def _quantise_up(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """[0, 1] float map -> 8-bit levels -> bilinear upsample (PIL, fixed point) -> float32 in [0, 1]."""
    q = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(q).resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0


def _small_gray(image: np.ndarray, size: int) -> np.ndarray:
    g = ((luma_x1000(image) + 500) // 1000).astype(np.uint8)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR), dtype=np.float64)


def spectral_residual(image: np.ndarray, size: int = WORK_SIZE, sigma: float = SR_BLUR_SIGMA) -> np.ndarray:
    """Hou & Zhang's spectral residual saliency at `size` px, normalised to [0, 1] (float64 size x size).

    log amplitude spectrum minus its 3x3 local mean is the "residual"; transformed back with the
    original phase and squared, it highlights what is unexpected in the image, then is Gaussian smoothed.
    """
    g = _small_gray(as_rgb(image), size)
    spectrum = np.fft.fft2(g)
    log_amp = np.log(np.abs(spectrum) + 1e-8)
    residual = log_amp - ndimage.uniform_filter(log_amp, size=3, mode="wrap")
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    return _normalise(ndimage.gaussian_filter(sal, sigma))


def border_contrast(image: np.ndarray, size: int = WORK_SIZE, sigma: float = CONTRAST_BLUR_SIGMA) -> np.ndarray:
    """Return each pixel's colour distance from the frame's median colour, float64 size x size in [0, 1].

    A cheap object prior: product photos put the object in front of a plain background that fills the
    frame. Undefined (all zero) for a uniform image.
    """
    small = np.asarray(Image.fromarray(as_rgb(image)).resize((size, size), Image.BILINEAR), dtype=np.float64)
    b = BORDER_WIDTH
    frame = np.concatenate([small[:b].reshape(-1, 3), small[-b:].reshape(-1, 3),
                            small[:, :b].reshape(-1, 3), small[:, -b:].reshape(-1, 3)])
    ref = np.median(frame, axis=0)
    dist = np.sqrt(((small - ref) ** 2).sum(axis=2))
    return _normalise(ndimage.gaussian_filter(dist, sigma))


def spectral_residual_saliency(image: np.ndarray, contrast_weight: float = CONTRAST_WEIGHT) -> np.ndarray:
    """Unsupervised saliency, float32 HxW in [0, 1], at the image's own size; needs no weights.

    (1 - contrast_weight) * spectral residual + contrast_weight * border contrast, renormalised,
    quantised to 8 bits and upsampled. contrast_weight=0 gives the plain spectral residual.
    """
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    combined = (1.0 - contrast_weight) * spectral_residual(rgb)
    if contrast_weight > 0:
        combined = combined + contrast_weight * border_contrast(rgb)
    return _quantise_up(_normalise(combined), h, w)


def find_saliency_file(folder: str | Path, image_path: str | Path) -> Path | None:
    """Return the map in `folder` whose stem is the image's stem (any image format or .npy), or None.

    If several formats exist for one stem, the first in MAP_EXTENSIONS order wins. Maps are matched by
    stem only, so keep one folder per class and split (MVTec reuses 000.png across folders).
    """
    folder, stem = Path(folder), Path(image_path).stem
    if not folder.is_dir():
        return None
    candidates = {p.suffix.lower(): p for p in folder.iterdir() if p.is_file() and p.stem == stem}
    for ext in MAP_EXTENSIONS:
        if ext in candidates:
            return candidates[ext]
    return None


def _read_map(path: Path) -> np.ndarray:
    """A saliency file as float32 HxW in [0, 1]: images by their luma (16-bit scaled), .npy min-max normalised."""
    if path.suffix.lower() == ".npy":
        a = np.asarray(np.load(path), dtype=np.float64)
        a = a.mean(axis=2) if a.ndim == 3 else a
        return _normalise(a).astype(np.float32)
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64) / 65535.0
        else:
            a = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def resize_map(sal: np.ndarray, height: int, width: int) -> np.ndarray:
    """Return a [0, 1] map brought to HxW through 8-bit levels (bilinear), as float32."""
    sal = np.asarray(sal, dtype=np.float64)
    if sal.shape == (height, width):
        return (np.clip(np.rint(sal * 255.0), 0, 255) / 255.0).astype(np.float32)
    return _quantise_up(np.clip(sal, 0.0, 1.0), height, width)


def load_saliency_folder(folder: str | Path, image_path: str | Path,
                         size: tuple[int, int] | None = None) -> np.ndarray | None:
    """Return the map for `image_path` from `folder`, float32 in [0, 1] resized to the image, or None.

    `size` is (height, width); when omitted it is read from the image file's header. None means no map
    for this image: the caller decides the fallback (DefectMaker uses the spectral-residual estimate).
    """
    path = find_saliency_file(folder, image_path)
    if path is None:
        return None
    sal = _read_map(path)
    if size is None:
        with Image.open(image_path) as im:
            size = (im.height, im.width)
    return resize_map(sal, int(size[0]), int(size[1]))


def saliency_region(sal: np.ndarray | None, threshold: float = DEFAULT_THRESHOLD, mode: str = "saliency",
                    min_fraction: float = MIN_REGION_FRACTION, shape: tuple[int, int] | None = None) -> np.ndarray:
    """bool HxW mask of allowed defect centres: `sal >= threshold`, or the whole image.

    The whole image is used for mode="whole" (textures), for a missing map (then `shape` gives HxW),
    and when the thresholded region covers less than `min_fraction` of the image, since a handful of
    salient pixels is more likely noise than an object.

    Raises:
        ValueError: If `mode` is unknown, or both `sal` and `shape` are None.
    """
    if mode not in ("saliency", "whole"):
        raise ValueError(f"mode must be 'saliency' or 'whole', got {mode!r}")
    if sal is None:
        if shape is None:
            raise ValueError("saliency_region needs a map or a shape")
        return np.ones(shape, dtype=bool)
    sal = np.asarray(sal)
    if mode == "whole":
        return np.ones(sal.shape, dtype=bool)
    region = sal >= threshold
    if region.sum() < max(1.0, min_fraction * region.size):
        return np.ones(sal.shape, dtype=bool)
    return region


def sample_centre(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int]:
    """Draw (cy, cx) uniformly among the True pixels of `region` (row-major order, one draw).

    Raises:
        ValueError: If `region` has no True pixel.
    """
    idx = np.flatnonzero(region)
    if idx.size == 0:
        raise ValueError("empty centre region")
    i = int(idx[int(rng.integers(0, idx.size))])
    return i // region.shape[1], i % region.shape[1]
