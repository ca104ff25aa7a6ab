"""DefectMaker placement (issue 15): object classes keep each defect on the object, textures keep
defects everywhere, and Bezier-scars are thin curves of a stated width."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reb_dist
from reb_dist.core.defectmaker import SHAPES, DefectMaker, dihedral
from reb_dist.core.defectmaker.placement import object_mask, on_object_fraction, stroke_widths
from reb_dist.core.defectmaker.shapes import SCAR_STROKE

BOTTLE = Path(reb_dist.__file__).parent / "sample_data" / "mvtec_ad_256" / "bottle" / "train" / "good" / "000.png"


def _object_image(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright, slightly textured ellipse off-centre on a dark noisy background: (RGB image, true mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    obj = ((yy - 0.45 * size) / (0.3 * size)) ** 2 + ((xx - 0.55 * size) / (0.22 * size)) ** 2 <= 1.0
    grey = np.where(obj, 200, 25) + rng.integers(-12, 13, size=(size, size))
    image = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    image[obj, 0] = np.clip(image[obj, 0].astype(int) + 30, 0, 255)  # a coloured object, not a grey one
    return image, obj


def _texture(size: int = 128, seed: int = 1) -> np.ndarray:
    """Vertical grey streaks over the whole frame, like a magnetic tile: no object, no plain background."""
    rng = np.random.default_rng(seed)
    cols = np.repeat(rng.integers(40, 200, size=size // 4), 4)
    grey = np.clip(cols[None, :] + rng.integers(-30, 31, size=(size, size)), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def test_object_mask_finds_the_synthetic_object_and_the_bottle():
    image, truth = _object_image()
    est = object_mask(image)
    assert est.shape == truth.shape and est.dtype == bool
    assert (est & truth).sum() / (est | truth).sum() > 0.93  # IoU with the drawn ellipse
    bottle = np.asarray(Image.open(BOTTLE).convert("RGB"))
    m = object_mask(bottle)
    h, w = m.shape
    assert m[h // 2 - 20:h // 2 + 20, w // 2 - 20:w // 2 + 20].all()  # the bottle's dark mouth is inside
    assert not m[:8, :8].any() and not m[-8:, -8:].any()  # the light background corners are not
    assert 0.4 < m.mean() < 0.8


def test_every_defect_on_a_synthetic_object_is_at_least_95_percent_on_it():
    image, truth = _object_image()
    maker = DefectMaker(image_size=128)
    samples = [s for seed in range(20) for s in maker.sample_all(image, seed)[1:]]  # 20 images x 6 classes
    fractions = [on_object_fraction(s.mask, dihedral(truth, s.meta["dihedral"])) for s in samples]
    assert len(fractions) == 120
    assert min(fractions) >= 0.95, sorted(fractions)[:5]  # measured on the true object, not the estimate
    assert all(s.meta["placement_tries"] >= 1 and s.meta["on_object"] >= 0.95 for s in samples)


def test_a_given_map_is_the_object_mask():
    image, _ = _object_image()
    left = np.zeros((128, 128), dtype=np.float32)
    left[:, :50] = 1.0  # the user's map says the object is the left strip, whatever the image shows
    maker = DefectMaker(image_size=128, augmentation=False)
    for seed in range(5):
        for s in maker.sample_all(image, seed, saliency_map=left)[1:]:
            assert s.meta["saliency"] == "given"
            assert on_object_fraction(s.mask, left > 0.5) >= 0.95


def test_textures_keep_whole_image_placement():
    texture = _texture()
    assert object_mask(texture).all()  # the streaks reach the frame: no object, the whole image
    assert object_mask(np.full((64, 64, 3), 90, dtype=np.uint8)).all()  # a blank image has no object either
    for s in DefectMaker(image_size=128).sample_all(texture, 3)[1:]:
        assert s.meta["placement_tries"] is None and s.meta["on_object"] is None  # no object: drawn once


def test_whole_image_saliency_still_samples_everywhere():
    image, truth = _object_image()
    maker = DefectMaker(image_size=128, saliency="whole", augmentation=False)
    centres = [s.meta["centre"] for seed in range(15) for s in maker.sample_all(image, seed)[1:]]
    off = [not truth[cy, cx] for cy, cx in centres]
    assert 0.5 < np.mean(off) < 0.9  # the background is 79% of this image: centres land there too
    assert {(cy >= 64, cx >= 64) for cy, cx in centres} == {(a, b) for a in (False, True) for b in (False, True)}


def test_stroke_widths_measure_a_bar_and_a_disc():
    bar = np.zeros((40, 60), dtype=bool)
    bar[10:15, 5:55] = True  # 5 px thick
    assert np.median(stroke_widths(bar)) == 5.0
    thin = np.zeros((40, 60), dtype=bool)
    thin[20:23, 5:55] = True
    assert np.median(stroke_widths(thin)) == 3.0
    assert stroke_widths(np.zeros((5, 5), dtype=bool)).size == 0


@pytest.mark.parametrize("size", [256, 512])
def test_bezier_scars_are_thin_curves_of_the_stated_width(size):
    rng = np.random.default_rng(0)
    scale = size / 256
    medians, areas = [], []
    for _ in range(40):
        m = SHAPES["bezier_scar"](rng, size, size, (size // 2, size // 2))
        w = stroke_widths(m)
        assert w.max() <= SCAR_STROKE[1] * scale + 1.0  # never wider than the widest stroke (+1 px rounding)
        medians.append(np.median(w))
        areas.append(m.sum())
        ys, xs = np.nonzero(m)
        extent = max(np.ptp(ys), np.ptp(xs)) + 1
        assert extent >= 2 * np.median(w)  # a line, longer than it is wide (the shortest box is 15 px)
    assert SCAR_STROKE[0] * scale - 1.0 <= np.median(medians) <= SCAR_STROKE[1] * scale
    assert np.median(areas) < 40 * 5 * scale * scale  # far below a filled 7-21 x 15-30 px blob


def test_on_object_fraction_counts_the_solid_part_and_refuses_bad_input():
    obj = np.zeros((10, 10), dtype=bool)
    obj[:, :5] = True
    soft = np.zeros((10, 10), dtype=np.float32)
    soft[0, 3:7] = 1.0  # two pixels on, two off
    soft[0, 7:9] = 0.2  # a faint blend rim: not counted
    assert on_object_fraction(soft, obj) == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        on_object_fraction(soft, obj[:5])
    with pytest.raises(ValueError, match="empty"):
        on_object_fraction(np.zeros((10, 10)), obj)
