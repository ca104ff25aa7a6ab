"""Figures: ROC curves, heatmap overlays, heatmap and defect galleries, a tune search's Pareto front.

Figures use ``matplotlib.figure.Figure`` directly (never pyplot), so nothing depends on a GUI
backend or on global pyplot state, and rendering is safe in worker processes and threads.
Every file is written atomically (reb_dist.io.atomic): a crashed or killed job never leaves a half-written PNG that
an artifact uploader (MLflow) would pick up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from reb_dist.core.metrics import auroc, roc_curve
from reb_dist.io.atomic import write_atomic

_MAX_CURVE_POINTS = 4000  # plotted ROC points; 10M-pixel curves are thinned to this


def save_png(array_uint8: np.ndarray, path: str | Path) -> Path:
    """Write an H×W or H×W×3/4 uint8 array as PNG, atomically (temp file + ``os.replace``); returns `path`.

    Raises:
        ValueError: If the array is not uint8.
    """
    from PIL import Image

    arr = np.asarray(array_uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {arr.dtype}")
    img = Image.fromarray(np.ascontiguousarray(arr))
    return write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib Figure as PNG at `dpi`, atomically; returns `path`."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _thin_curve(fpr: np.ndarray, tpr: np.ndarray, n: int = _MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Keep ~n points evenly spaced along the curve (fpr + tpr grows monotonically from 0 to 2)."""
    if fpr.size <= n:
        return fpr, tpr
    idx = np.unique(np.searchsorted(fpr + tpr, np.linspace(0.0, 2.0, n)).clip(0, fpr.size - 1))
    idx = np.r_[0, idx, fpr.size - 1]
    return fpr[idx], tpr[idx]


def plot_roc_curves(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    title: str = "ROC",
    figsize: tuple[float, float] = (5.0, 5.0),
    dpi: int = 100,
) -> Path:
    """One ROC curve per method on shared axes, AUROC in the legend; saves a PNG of figsize*dpi px.

    ``curves`` maps a method name to (labels, scores); pixel-level inputs are fine (the drawn
    curve is thinned, the AUROC is exact).

    Returns:
        `path` as a Path.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.add_subplot()
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=True)
        fpr, tpr = _thin_curve(fpr, tpr)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {100 * auroc(labels, scores):.1f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate", title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        return img[..., :3]
    raise ValueError(f"image must be H×W or H×W×3, got shape {img.shape}")


def heatmap_overlay(
    image_uint8_hxwx3: np.ndarray,
    anomaly_map_hxw: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a jet-coloured anomaly map over the image; H×W×3 uint8.

    Pass a shared ``vmin``/``vmax`` across images so colours are comparable (default: this
    map's own range). A ground-truth ``mask`` is drawn as a green contour, leaving the defect
    itself visible.

    Raises:
        ValueError: If the image is not uint8 H×W or H×W×3/4, or the map or mask shape differs from it.
    """
    from matplotlib import colormaps

    rgb = _as_rgb(image_uint8_hxwx3)
    amap = np.asarray(anomaly_map_hxw, dtype=np.float64)
    if amap.shape != rgb.shape[:2]:
        raise ValueError(f"anomaly map shape {amap.shape} != image shape {rgb.shape[:2]}")
    lo = float(np.nanmin(amap)) if vmin is None else float(vmin)
    hi = float(np.nanmax(amap)) if vmax is None else float(vmax)
    norm = np.clip((amap - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(amap)
    color = colormaps["jet"](np.nan_to_num(norm), bytes=True)[..., :3].astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * color
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if mask is not None:
        m = np.asarray(mask) > 0
        if m.shape != amap.shape:
            raise ValueError(f"mask shape {m.shape} != map shape {amap.shape}")
        edge = m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)
        out[edge] = (0, 255, 0)
    return out


@dataclass(frozen=True)
class OverlayCaption:
    """What `annotated_overlay` writes beside and under an overlay.

    Attributes:
        score: the image score.
        threshold: the image threshold used (None: none, nothing flagged).
        flagged: whether the image was flagged (None without a threshold).
        scale: what the colours mean, e.g. "pixel scores normalised by the calibration".
        bar_threshold: where the threshold sits on the colour scale (None: not shown).
        hot_box: (left, top, right, bottom) of the hottest patch in the overlay's pixels, or None.
        nearest: e.g. "train/good/012.png, row 3 col 5, distance 1.2" (None: unknown).
        nearest_image: that training image, uint8 (H, W, 3), or None when it cannot be read.
        nearest_box: the matched patch's box in `nearest_image`'s pixels.
    """

    score: float
    threshold: float | None = None
    flagged: bool | None = None
    scale: str = ""
    bar_threshold: float | None = None
    hot_box: tuple[int, int, int, int] | None = None
    nearest: str | None = None
    nearest_image: np.ndarray | None = None
    nearest_box: tuple[int, int, int, int] | None = None


def annotated_overlay(overlay: np.ndarray, vmin: float, vmax: float, caption: OverlayCaption) -> np.ndarray:
    """An overlay (from `heatmap_overlay`, at the input image's size) made readable on its own: a
    colour bar with its range and the threshold marked, the hottest patch boxed, the nearest
    training image with its matched patch boxed (when known), and a caption with the score, the
    threshold and the verdict. Drawn with PIL (no figure per image: predict stays fast).
    Returns H'×W'×3 uint8."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    rgb = _as_rgb(overlay)
    h, w = rgb.shape[:2]
    size = max(11, min(24, h // 28))
    try:
        font = ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # a Pillow without FreeType: its fixed bitmap font
        font = ImageFont.load_default()
    bar_w, label_w, gap = max(12, w // 40), 7 * size, max(4, size // 2)
    panels = [Image.fromarray(rgb)]
    if caption.hot_box is not None:
        ImageDraw.Draw(panels[0]).rectangle(caption.hot_box, outline=(255, 255, 255), width=max(2, size // 6))
    ramp = np.linspace(1.0, 0.0, h)[:, None].repeat(bar_w, 1)
    bar = Image.fromarray(colormaps["jet"](ramp, bytes=True)[..., :3])
    scale = Image.new("RGB", (bar_w + label_w, h), "white")
    scale.paste(bar, (0, 0))
    draw = ImageDraw.Draw(scale)
    draw.text((bar_w + 3, 0), f"{vmax:.3g}", fill="black", font=font)
    draw.text((bar_w + 3, h - size - 2), f"{vmin:.3g}", fill="black", font=font)
    if caption.bar_threshold is not None and vmax > vmin and vmin <= caption.bar_threshold <= vmax:
        y = int(round((vmax - caption.bar_threshold) / (vmax - vmin) * (h - 1)))
        draw.line([(0, y), (bar_w + 2, y)], fill="black", width=2)
        draw.text((bar_w + 3, min(max(y - size // 2, size + 2), h - 2 * size - 4)), "threshold", fill="black",
                  font=font)
    panels.append(scale)
    if caption.nearest_image is not None:
        near = Image.fromarray(_as_rgb(caption.nearest_image))
        factor = h / near.height
        near = near.resize((max(1, int(round(near.width * factor))), h), Image.Resampling.BILINEAR)
        if caption.nearest_box is not None:
            box = tuple(int(round(v * factor)) for v in caption.nearest_box)
            ImageDraw.Draw(near).rectangle(box, outline=(255, 255, 255), width=max(2, size // 6))
        panels.append(near)
    if caption.threshold is None:
        verdict = f"score {caption.score:.4g} (no threshold: not flagged)"
    else:
        sign, word = (">=", "ANOMALOUS") if caption.flagged else ("<", "normal")
        verdict = f"score {caption.score:.4g} {sign} threshold {caption.threshold:.4g}: {word}"
    lines = [verdict, f"colours: {caption.scale}" if caption.scale else ""]
    if caption.nearest:
        lines.append(f"nearest normal patch (right, boxed): {caption.nearest}" if caption.nearest_image is not None
                     else f"nearest normal patch: {caption.nearest}")
    lines = [line for line in lines if line]
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (width, h + (size + 4) * len(lines) + 6), "white")
    x = 0
    for panel in panels:
        out.paste(panel, (x, 0))
        x += panel.width + gap
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        colour = (200, 0, 0) if i == 0 and caption.flagged else (0, 0, 0)
        draw.text((4, h + 4 + i * (size + 4)), line, fill=colour, font=font)
    return np.asarray(out)


def heatmap_grid(
    items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
    path: str | Path,
    vmin: float | None = None,
    vmax: float | None = None,
    ncols: int = 4,
    cell_inches: float = 3.0,
    dpi: int = 100,
) -> Path:
    """Grid of (title, image, map, mask|None) overlays with one shared colour scale and colourbar.

    ``vmin``/``vmax`` default to the range over all maps, so hot spots compare across examples.

    Returns:
        `path` as a Path, where the PNG was written.

    Raises:
        ValueError: If `items` is empty.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not items:
        raise ValueError("heatmap_grid needs at least one item")
    if vmin is None:
        vmin = min(float(np.nanmin(m)) for _, _, m, _ in items)
    if vmax is None:
        vmax = max(float(np.nanmax(m)) for _, _, m, _ in items)
    ncols = max(1, min(ncols, len(items)))
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(cell_inches * ncols + 0.8, cell_inches * nrows), dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (title, image, amap, mask) in zip(axes.flat, items):
        ax.imshow(heatmap_overlay(image, amap, vmin, vmax, mask))
        ax.set_title(str(title), fontsize="small")
    sm = ScalarMappable(norm=Normalize(vmin, vmax), cmap=colormaps["jet"])
    fig.colorbar(sm, ax=axes, shrink=0.8, label="anomaly score")
    return save_figure(fig, path, dpi)


def defect_gallery(rows: Sequence[Sequence[tuple[str, np.ndarray, np.ndarray]]], path: str | Path,
                   cell_inches: float = 2.0, dpi: int = 100) -> Path:
    """Save a gallery of generated defects as PNG and return `path`.

    One row per base image, one (class name, image, mask) per column; the mask is drawn as a green
    contour so the synthetic defect itself stays visible.
    """
    from matplotlib.figure import Figure

    ncols = max(len(r) for r in rows)
    fig = Figure(figsize=(cell_inches * ncols, cell_inches * len(rows) + 0.3), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, row in enumerate(rows):
        for c, (title, image, mask) in enumerate(row):
            m = np.asarray(mask) > 0.05
            axes[r, c].imshow(heatmap_overlay(image, np.zeros(m.shape), mask=m if m.any() else None, alpha=0.0))
            if r == 0:
                axes[r, c].set_title(title, fontsize="x-small")
    return save_figure(fig, path, dpi)


def pareto_plot(trials: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]],
                choice: Mapping[str, Any] | None, reference: Mapping[str, Any] | None, category: str) -> Any:
    """The coupled (K, alpha) search's trade-off: every trial as a grey point (x = validation image
    AUROC, y = validation map objective), the Pareto front as a line, the choice and the default
    (`reference`) marked. Save it with `save_figure`.

    Args:
        trials, front: dicts with ``val_image_auroc`` and ``map_objective`` (front points also K and alpha).
        choice: the front point chosen, or None.
        reference: the default setting's point, or None.
        category: the class, in the title.

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.add_subplot()
    ax.scatter([t["val_image_auroc"] for t in trials], [t["map_objective"] for t in trials], s=18, c="grey",
               alpha=0.6, label=f"trials ({len(trials)})")
    ax.plot([p["val_image_auroc"] for p in front], [p["map_objective"] for p in front], "-o", c="tab:blue",
            ms=4, lw=1.5, label="Pareto front")
    if reference is not None:
        ax.scatter([reference["val_image_auroc"]], [reference["map_objective"]], marker="X", s=120, c="black",
                   label=f"default (K={reference['k']}, alpha={reference['alpha']:.3g})", zorder=3)
    if choice is not None:
        ax.scatter([choice["val_image_auroc"]], [choice["map_objective"]], marker="*", s=250, c="red",
                   label=f"choice (K={choice['k']}, alpha={choice['alpha']:.3g})", zorder=4)
    ax.set_xlabel("validation image AUROC")
    ax.set_ylabel("validation map objective (pixel AUROC + AUPRO) / 2")
    ax.set_title(f"{category}: coupled (K, alpha), Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    return fig
