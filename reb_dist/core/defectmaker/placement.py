"""Is a defect on the object? A weight-free object mask, and the measures that check placement.

The saliency map says where a defect may be *centred*; a large Bezier shape centred near the object's
outline still spills onto the background, and a defect on the plain background can be found by
looking for any change there, which teaches the network nothing about the object (issue 15). The
object mask here is the same cheap prior as saliency's border-contrast term: product photos put the
object in front of a plain background that fills the frame, so pixels whose colour is far from the
frame's median colour (Otsu's threshold on that distance) are the object. Holes are filled (a
bottle's dark mouth is part of the bottle) and specks dropped.

When the frame is not plain (the object-vs-background split also cuts through the frame, as on a
texture such as magnetic_tile) or the split leaves almost nothing on one side, there is no object to
find and the mask is the whole image: textures keep their defects everywhere.

Everything works on a 64 px copy with integer histograms and is deterministic.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from reb_dist.core.defectmaker.fills import as_rgb
from reb_dist.core.defectmaker.saliency import sample_centre
from reb_dist.core.defectmaker.shapes import MIN_PIXELS, size_scale

WORK_SIZE = 64  # px: the mask is estimated at 64x64 (as the saliency map) and upsampled
BORDER_WIDTH = 3  # px at 64: the frame whose median colour is "background"
MAX_FRAME_SHARE = 0.02  # more of the frame than this on the object side: no plain background (texture)
OBJECT_AREA_RANGE = (0.03, 0.97)  # an object outside this share of the image is not trusted
MIN_SEPARATION = 0.85  # Otsu's between-class / total variance below this: no clear object
KEEP_COMPONENT = 0.2  # components smaller than this share of the largest are specks
MIN_ON_OBJECT = 0.95  # share of a defect's area that must lie on the object
PLACE_TRIES = 8  # shapes drawn before the last one is cut to the object
SAFETY_MARGIN = 2.0  # px at 256 kept free at the estimated outline: the 64 px estimate is off by up to
# half a cell (2 px at 256) from the true one


def _otsu(values: np.ndarray) -> tuple[int, float]:
    """Return (threshold t on 0..255 levels, object = values > t; separation eta in [0, 1])."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * levels)
    mean = m0[-1]
    total = float((p * (levels - mean) ** 2).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean * w0 - m0) ** 2 / (w0 * (1.0 - w0))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    t = int(np.argmax(between))
    return t, (float(between[t]) / total if total > 0 else 0.0)


def _frame(mask: np.ndarray, b: int) -> np.ndarray:
    return np.concatenate([mask[:b].ravel(), mask[-b:].ravel(), mask[b:-b, :b].ravel(), mask[b:-b, -b:].ravel()])


def object_mask(image: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    """bool HxW mask of the object in `image` (uint8 HxW or HxWxC), or all True when there is none.

    Colour distance from the frame's median colour, lightly smoothed, split by Otsu's threshold; holes
    filled, specks (components under a fifth of the largest) dropped, upsampled to the image's size.
    All True ("anywhere") when the frame is not plain, the split is weak, or the object would cover
    under 3% or over 97% of the image.
    """
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), dtype=np.float64)
    b = BORDER_WIDTH
    frame = np.concatenate([small[:b].reshape(-1, 3), small[-b:].reshape(-1, 3),
                            small[b:-b, :b].reshape(-1, 3), small[b:-b, -b:].reshape(-1, 3)])
    dist = np.sqrt(((small - np.median(frame, axis=0)) ** 2).sum(axis=2))
    dist = ndimage.gaussian_filter(dist, 1.0)
    top = float(dist.max())
    whole = np.ones((h, w), dtype=bool)
    if top <= 1e-9:
        return whole
    levels = np.clip(np.rint(dist * (255.0 / top)), 0, 255).astype(np.uint8)
    t, separation = _otsu(levels)
    fg = levels > t
    if separation < MIN_SEPARATION or float(_frame(fg, b).mean()) > MAX_FRAME_SHARE:
        return whole
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, iterations=1))
    labels, n = ndimage.label(fg)
    if n == 0:
        return whole
    sizes = np.bincount(labels.ravel())[1:]
    fg = np.isin(labels, 1 + np.flatnonzero(sizes >= KEEP_COMPONENT * sizes.max()))
    share = float(fg.mean())
    if not OBJECT_AREA_RANGE[0] <= share <= OBJECT_AREA_RANGE[1]:
        return whole
    up = Image.fromarray(fg.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)
    return np.asarray(up) >= 128


def on_object_fraction(defect_mask: np.ndarray, object_mask: np.ndarray) -> float:
    """Share of the defect's area (mask >= 0.5, so a blend's faint rim does not count; mask > 0 for a
    blended stroke so thin that no pixel reaches 0.5) on the object.

    Raises:
        ValueError: If the masks differ in shape or the defect is empty.
    """
    d = np.asarray(defect_mask)
    if d.shape != np.asarray(object_mask).shape:
        raise ValueError(f"defect mask {d.shape} and object mask {np.asarray(object_mask).shape} differ in shape")
    area = d >= 0.5 if d.dtype != bool else d
    if not area.any():
        area = d > 0
    n = int(area.sum())
    if n == 0:
        raise ValueError("empty defect mask")
    return int((area & np.asarray(object_mask, dtype=bool)).sum()) / n


def stroke_widths(mask: np.ndarray) -> np.ndarray:
    """Local thickness in px along a shape's ridge: 2 * (distance to the background) - 1 at the pixels
    where that distance is a local maximum (the medial axis), so a line w px wide gives about w.

    Returns:
        float64 array, one value per ridge pixel (empty for an empty mask).
    """
    m = np.asarray(mask) >= 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)
    if not m.any():
        return np.zeros(0)
    dt = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    ridge = m & (dt >= ndimage.maximum_filter(dt, size=3))
    return 2.0 * dt[ridge] - 1.0


def width_at_256(width_px: float, height: int, width: int) -> float:
    """A width measured on an HxW image in px at 256 (sizes scale with sqrt(H*W)/256)."""
    return width_px * 256.0 / math.sqrt(height * width)


def object_core(obj: np.ndarray, margin: float = SAFETY_MARGIN) -> np.ndarray:
    """`obj` eroded by `margin` px at 256 (scaled with the image), where placement may put defects so
    that the estimate's outline error cannot put them on the background; `obj` itself if that empties it."""
    h, w = obj.shape
    r = max(1, int(round(margin * size_scale(h, w))))
    core = ndimage.binary_erosion(obj, iterations=r, border_value=0)
    return core if core.any() else obj


def place_on_object(rng: np.random.Generator, draw_shape: Callable[..., np.ndarray], obj: np.ndarray,
                    region: np.ndarray, centre: tuple[int, int], min_fraction: float = MIN_ON_OBJECT,
                    tries: int = PLACE_TRIES) -> tuple[np.ndarray, tuple[int, int], int, bool]:
    """Draw a shape whose area lies at least `min_fraction` on `obj`: (bool mask, centre, tries, clipped).

    The first shape is drawn around `centre`; one that spills off the object is redrawn around a new
    centre from `region` (centres must lie on the object), up to `tries` shapes in all. If none fits,
    the last one is cut to the object (a defect at the object's edge, as a chipped rim is); a cut
    that leaves under MIN_PIXELS pixels becomes the object's part of a small disc at the centre.
    """
    h, w = obj.shape
    hard = draw_shape(rng, h, w, centre)
    for attempt in range(1, tries + 1):
        if attempt > 1:
            centre = sample_centre(rng, region)
            hard = draw_shape(rng, h, w, centre)
        if on_object_fraction(hard, obj) >= min_fraction:
            return hard, centre, attempt, False
    cut = hard & obj
    if int(cut.sum()) < min(MIN_PIXELS, int(obj.sum())):
        r = max(2.0, 3.0 * size_scale(h, w))
        yy, xx = np.ogrid[:h, :w]
        cut = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r) & obj
    return cut, centre, tries, True
