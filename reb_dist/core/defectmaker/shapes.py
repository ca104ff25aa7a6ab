"""Defect shapes: where a synthetic defect sits, as a bool mask the size of the image.

REB's DefectMaker (paper section 3.1.1) draws Bezier shapes because CutPaste's rectangles are too
simple to teach a CNN what real defects look like; the rectangles stay here for the CutPaste baseline
(REB Table 5). Every shape is placed around a given centre (picked from the saliency region by the
caller), clipped to the image, and never empty: a defect class whose sample shows no defect would be a
mislabelled training example.

Reproducibility: all randomness comes from the caller's ``np.random.Generator``, drawn in a fixed order;
geometry uses scalar ``math`` trigonometry and plain float64 arithmetic, and rasterising goes through
PIL's integer polygon filler, so the same generator state gives the same mask on any machine.
Pixel sizes quoted "at 256 px" (scar boxes, stroke widths) scale with sqrt(H*W)/256.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

Centre = tuple[int, int]
ShapeFn = Callable[..., np.ndarray]

REFERENCE_SIZE = 256  # the image side at which pixel sizes below are given
AREA_RANGE = (0.02, 0.15)  # bounding-box area as a fraction of the image (CutPaste and DefectMaker)
MAX_ASPECT = 3.3  # aspect ratio (width/height) is log-uniform in [1/3.3, 3.3]
RECT_SCAR_WIDTH = (2.0, 16.0)  # CutPaste's scar, px at 256
RECT_SCAR_HEIGHT = (10.0, 25.0)
BEZIER_SCAR_WIDTH = (7.0, 21.0)  # DefectMaker's Bezier-scar box, px at 256 (METHOD-NOTES)
BEZIER_SCAR_HEIGHT = (15.0, 30.0)
SCAR_STROKE = (2.0, 5.0)  # px at 256: the Bezier-scar's line width (a scratch, issue 15)
SCAR_SAMPLES = 24  # points along the scar's curve
ROTATION_RANGE = (-45.0, 45.0)  # degrees
CONTROL_POINTS = (5, 6)  # Bezier control points per curve, inclusive
CLUMP_CELL = (6.0, 14.0)  # blob-field cell size, px at 256: a few cells per shape gives several pieces
CLUMP_THRESHOLD = 150  # on the 0..255 upsampled uniform noise: keeps roughly a third of the field
MIN_PIXELS = 4  # a shape smaller than this is redrawn
MAX_TRIES = 20  # redraws before falling back to a small disc at the centre


def size_scale(height: int, width: int) -> float:
    """Return how much pixel sizes given at 256x256 scale for this image (geometric mean side / 256)."""
    return math.sqrt(height * width) / REFERENCE_SIZE


def default_centre(height: int, width: int) -> Centre:
    """Return the image centre (row, col), used when a caller gives no centre."""
    return height // 2, width // 2


def box_size(rng: np.random.Generator, height: int, width: int,
             area_range: tuple[float, float] = AREA_RANGE, max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """Draw (box height, box width), each >= 2, with area U[area_range] of the image, log-uniform aspect.

    When the aspect ratio would make the box wider (taller) than the image, that side is cut to the
    image and the other grows to keep the area, as CutPaste does.
    """
    area = rng.uniform(area_range[0], area_range[1]) * height * width
    aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))  # width / height
    bw, bh = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if bw > width:
        bw, bh = float(width), area / width
    if bh > height:
        bh, bw = float(height), min(float(width), area / height)
    return max(2, int(round(bh))), max(2, int(round(bw)))


def scar_size(rng: np.random.Generator, height: int, width: int, width_range: tuple[float, float],
              height_range: tuple[float, float]) -> tuple[int, int, float]:
    """Draw (scar height, scar width, rotation in degrees) of a thin box; sizes scale with the image."""
    s = size_scale(height, width)
    sw = rng.uniform(width_range[0], width_range[1]) * s
    sh = rng.uniform(height_range[0], height_range[1]) * s
    angle = rng.uniform(ROTATION_RANGE[0], ROTATION_RANGE[1])
    return max(3, int(round(sh))), max(2, int(round(sw))), float(angle)


def bezier_outline(rng: np.random.Generator, samples_per_segment: int = 24) -> np.ndarray:
    """Draw a closed smooth curve: (M, 2) (x, y) points whose bounding box is exactly [-0.5, 0.5]^2.

    5-6 control points sit at jittered, evenly spread angles around the origin (so they are sorted by
    angle and never coincide) at radii U[0.4, 1]. Consecutive points are joined by cubic Bezier segments
    whose inner handles follow the chord of the two neighbours (a cardinal spline), so the tangent is
    continuous at every control point and the curve is smooth; the handle length k ~ U[0.2, 0.5]
    (1/3 is Catmull-Rom) varies how round the blob looks.
    """
    n = int(rng.integers(CONTROL_POINTS[0], CONTROL_POINTS[1] + 1))
    offset = rng.uniform(0.0, 2.0 * math.pi)
    jitter = rng.uniform(-0.3, 0.3, size=n)
    radii = rng.uniform(0.4, 1.0, size=n)
    k = rng.uniform(0.2, 0.5)
    angles = [offset + 2.0 * math.pi * (i + float(jitter[i])) / n for i in range(n)]
    pts = np.array([[float(radii[i]) * math.cos(a), float(radii[i]) * math.sin(a)] for i, a in enumerate(angles)])
    tangents = np.roll(pts, -1, axis=0) - np.roll(pts, 1, axis=0)  # p[i+1] - p[i-1]
    p0, p3 = pts, np.roll(pts, -1, axis=0)
    p1 = p0 + (k / 2.0) * tangents
    p2 = p3 - (k / 2.0) * np.roll(tangents, -1, axis=0)
    t = (np.arange(samples_per_segment, dtype=np.float64) / samples_per_segment)[None, :, None]
    u = 1.0 - t
    curve = (u * u * u * p0[:, None] + 3.0 * u * u * t * p1[:, None] + 3.0 * u * t * t * p2[:, None]
             + t * t * t * p3[:, None]).reshape(-1, 2)
    lo, hi = curve.min(axis=0), curve.max(axis=0)
    return (curve - lo) / (hi - lo) - 0.5


def rasterize(points_xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fill a polygon given as (x, y) pixel coordinates into a bool HxW mask; parts outside are clipped."""
    canvas = Image.new("L", (width, height), 0)
    coords = [(int(x), int(y)) for x, y in np.rint(points_xy).tolist()]
    ImageDraw.Draw(canvas).polygon(coords, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def place(local: np.ndarray, height: int, width: int, centre: Centre) -> np.ndarray:
    """Put a small bool mask into an HxW canvas with its middle on `centre`, clipping what falls outside."""
    out = np.zeros((height, width), dtype=bool)
    lh, lw = local.shape
    y0, x0 = centre[0] - lh // 2, centre[1] - lw // 2
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(height, y0 + lh), min(width, x0 + lw)
    if ye > ys and xe > xs:
        out[ys:ye, xs:xe] = local[ys - y0:ye - y0, xs - x0:xe - x0]
    return out


def _rotate(points_xy: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate points about the origin (scalar trig so the result is the same on every machine)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    x, y = points_xy[:, 0], points_xy[:, 1]
    return np.stack([x * c - y * s, x * s + y * c], axis=1)


def _disc(height: int, width: int, centre: Centre) -> np.ndarray:
    """Last-resort shape: a small disc at the centre, so a defect class is never defect-free."""
    r = max(2.0, 3.0 * size_scale(height, width))
    yy, xx = np.ogrid[:height, :width]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


def _non_empty(draw: Callable[[], np.ndarray], height: int, width: int, centre: Centre) -> np.ndarray:
    """Redraw until the clipped shape has at least MIN_PIXELS pixels; fall back to a disc at the centre."""
    need = min(MIN_PIXELS, height * width)
    for _ in range(MAX_TRIES):
        mask = draw()
        if int(mask.sum()) >= need:
            return mask
    return _disc(height, width, centre)


def _check(height: int, width: int, centre: Centre | None) -> Centre:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if centre is None:
        return default_centre(height, width)
    cy, cx = int(centre[0]), int(centre[1])
    if not (0 <= cy < height and 0 <= cx < width):
        raise ValueError(f"centre {centre} lies outside the {height}x{width} image")
    return cy, cx


def rectangle(rng: np.random.Generator, height: int, width: int, centre: Centre | None = None) -> np.ndarray:
    """Draw CutPaste's rectangle: area U[0.02, 0.15] of the image, aspect log-uniform in [1/3.3, 3.3].

    Returns:
        A non-empty bool HxW mask around `centre` (the image centre when None), clipped to the image.

    Raises:
        ValueError: If the size is not positive or `centre` lies outside the image.
    """
    c = _check(height, width, centre)

    def draw() -> np.ndarray:
        bh, bw = box_size(rng, height, width)
        return place(np.ones((bh, bw), dtype=bool), height, width, c)

    return _non_empty(draw, height, width, c)


def rectangle_scar(rng: np.random.Generator, height: int, width: int, centre: Centre | None = None) -> np.ndarray:
    """Draw CutPaste's scar: a thin box 2-16 px wide, 10-25 px tall (at 256 px), rotated U[-45, 45] deg.

    Returns and raises as `rectangle`.
    """
    c = _check(height, width, centre)

    def draw() -> np.ndarray:
        sh, sw, angle = scar_size(rng, height, width, RECT_SCAR_WIDTH, RECT_SCAR_HEIGHT)
        corners = np.array([[-sw / 2, -sh / 2], [sw / 2, -sh / 2], [sw / 2, sh / 2], [-sw / 2, sh / 2]])
        return rasterize(_rotate(corners, angle) + [c[1], c[0]], height, width)

    return _non_empty(draw, height, width, c)


def bezier(rng: np.random.Generator, height: int, width: int, centre: Centre | None = None) -> np.ndarray:
    """Draw DefectMaker's Bezier shape: a filled smooth closed curve, its bounding box sized as CutPaste's.

    Returns and raises as `rectangle`.
    """
    c = _check(height, width, centre)

    def draw() -> np.ndarray:
        bh, bw = box_size(rng, height, width)
        outline = bezier_outline(rng) * [bw - 1, bh - 1]
        return rasterize(outline + [c[1], c[0]], height, width)

    return _non_empty(draw, height, width, c)


def bezier_scar(rng: np.random.Generator, height: int, width: int, centre: Centre | None = None) -> np.ndarray:
    """DefectMaker's Bezier-scar: a thin curved stroke (2-5 px wide at 256) inside a rotated scar box.

    The scar box is the paper's (7-21 px across, 15-30 px long at 256, rotated U[-45, 45] deg); the
    curve is a cubic Bezier from one short side of the box to the other whose four control points sit
    at random places across the box, so it bends within the box (a Bezier lies in its control points'
    hull). Drawn as a line SCAR_STROKE px wide, it is a scratch, not a small filled blob (issue 15).
    Returns and raises as `rectangle`.
    """
    c = _check(height, width, centre)
    s = size_scale(height, width)

    def draw() -> np.ndarray:
        sh, sw, angle = scar_size(rng, height, width, BEZIER_SCAR_WIDTH, BEZIER_SCAR_HEIGHT)
        stroke = max(1, int(round(rng.uniform(SCAR_STROKE[0], SCAR_STROKE[1]) * s)))
        sway = max(0.0, (sw - stroke) / 2.0)  # keeps the stroke's edges inside the box
        across = rng.uniform(-sway, sway, size=4)
        along = np.array([-0.5, -1.0 / 6.0, 1.0 / 6.0, 0.5]) * (sh - stroke)
        control = np.stack([across, along], axis=1)  # (x, y): the box's long side runs along y
        t = np.linspace(0.0, 1.0, SCAR_SAMPLES)[:, None]
        u = 1.0 - t
        curve = (u * u * u * control[0] + 3.0 * u * u * t * control[1] + 3.0 * u * t * t * control[2]
                 + t * t * t * control[3])
        points = np.rint(_rotate(curve, angle) + [c[1], c[0]]).tolist()
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).line([(int(x), int(y)) for x, y in points], fill=1, width=stroke, joint="curve")
        return np.asarray(canvas, dtype=bool)

    return _non_empty(draw, height, width, c)


def blob_field(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Return a bool HxW field: coarse uniform noise (one value per `cell` px), upsampled and thresholded.

    The upsampled field varies smoothly over a few cells, so the threshold cuts it into several
    separate blobs; integer noise and PIL's fixed-point resampling keep it reproducible.
    """
    gh = max(2, int(math.ceil(height / cell)) + 1)
    gw = max(2, int(math.ceil(width / cell)) + 1)
    low = rng.integers(0, 256, size=(gh, gw), dtype=np.int64).astype(np.uint8)
    field = np.asarray(Image.fromarray(low).resize((width, height), Image.BILINEAR))
    return field > CLUMP_THRESHOLD


def bezier_clump(rng: np.random.Generator, height: int, width: int, centre: Centre | None = None) -> np.ndarray:
    """DefectMaker's Bezier-clump: a Bezier shape broken into a clump of pieces by a thresholded blob field.

    Models scattered defects (contamination, spots) that a single connected blob does not cover.
    Returns and raises as `rectangle`.
    """
    c = _check(height, width, centre)
    s = size_scale(height, width)

    def draw() -> np.ndarray:
        bh, bw = box_size(rng, height, width)
        cell = rng.uniform(CLUMP_CELL[0], CLUMP_CELL[1]) * s
        blobs = blob_field(rng, bh, bw, max(cell, 2.0))
        outline = bezier_outline(rng) * [bw - 1, bh - 1] + [(bw - 1) / 2, (bh - 1) / 2]
        local = rasterize(outline, bh, bw) & blobs
        return place(local, height, width, c)

    return _non_empty(draw, height, width, c)


SHAPES: dict[str, ShapeFn] = {
    "rectangle": rectangle,
    "rectangle_scar": rectangle_scar,
    "bezier": bezier,
    "bezier_scar": bezier_scar,
    "bezier_clump": bezier_clump,
}
