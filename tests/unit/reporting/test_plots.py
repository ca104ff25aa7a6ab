"""Plots render headless, to the promised sizes, and files appear atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reb_dist.reporting import plots as P
from reb_dist.reporting import tables as T


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_plot_roc_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200_000)  # more points than are drawn
    curves = {"REB": (y, rng.normal(size=y.size) + y), "random": (y, rng.random(y.size))}
    out = P.plot_roc_curves(curves, tmp_path / "sub" / "roc.png", "bottle", figsize=(4, 3), dpi=100)
    img = _png(out)
    assert img.shape == (300, 400, 3) and img.std() > 0
    assert [p.name for p in out.parent.iterdir()] == ["roc.png"]


def test_heatmap_overlay_colours_and_contour() -> None:
    image = np.full((20, 30, 3), 128, np.uint8)
    amap = np.zeros((20, 30))
    amap[:, 15:] = 1.0
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:12] = True
    out = P.heatmap_overlay(image, amap, mask=mask, alpha=1.0)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert out[0, 29, 0] > 100 and out[0, 29, 2] < 50  # high score: red end of jet
    assert out[0, 0, 2] > 100 and out[0, 0, 0] < 50  # low score: blue end
    assert tuple(out[5, 8]) == (0, 255, 0)  # mask border is green ...
    assert tuple(out[10, 8]) != (0, 255, 0)  # ... its inside is not
    # Shared scale: a map inside [vmin, vmax] only uses part of the colormap; grayscale accepted.
    half = P.heatmap_overlay(image[..., 0], amap * 0.5, vmin=0, vmax=1, alpha=1.0)
    assert tuple(half[0, 29]) != tuple(out[0, 29])
    with pytest.raises(ValueError, match="shape"):
        P.heatmap_overlay(image, amap[:10])


def test_save_png_roundtrip_is_atomic(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    path = P.save_png(arr, tmp_path / "a.png")
    np.testing.assert_array_equal(_png(path), arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_bad_image_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        P.save_png(np.zeros((4, 4)), tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


def test_heatmap_grid_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    items = []
    for i in range(5):
        mask = np.zeros((32, 32), bool)
        mask[8:16, 8:16] = i % 2 == 0
        items.append((f"img {i}", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.random((32, 32)), mask))
    items[1] = (*items[1][:3], None)
    out = P.heatmap_grid(items, tmp_path / "grid.png", vmin=0.0, vmax=1.0, ncols=3, cell_inches=2, dpi=50)
    img = _png(out)
    assert img.shape == (2 * 2 * 50, int((3 * 2 + 0.8) * 50), 3)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_results_tables() -> None:
    rows = [
        {"category": "bottle", "image_auroc": 0.9912, "aupro": 0.93, "n": 83},
        {"category": "a|b", "image_auroc": 0.87, "aupro": float("nan"), "n": 150},
        {"category": "mean", "image_auroc": 0.93},
    ]
    md = T.results_table_markdown(rows, ["category", "image_auroc", "aupro", "n"])
    lines = md.strip().splitlines()
    assert lines[0] == "| category | image_auroc | aupro | n |"
    assert lines[1] == "|:---|---:|---:|---:|"
    assert lines[2] == "| bottle | 99.1 | 93.0 | 83 |"
    assert lines[3] == r"| a\|b | 87.0 | - | 150 |"
    assert lines[4] == "| mean | 93.0 | - | - |"
    txt = T.results_table_text(rows, ["category", "image_auroc"], float_fmt="{:.2f}")
    lines = txt.splitlines()
    assert lines[0] == "category  image_auroc"
    assert lines[2] == "bottle          99.12"
    assert len({len(line) for line in lines}) == 1  # aligned
