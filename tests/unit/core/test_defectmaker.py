"""DefectMaker on the real bottle images that ship with the package: shapes, fills, fusing, saliency,
determinism and the task class lists. Fast (a few seconds): everything is numpy at 256 px or smaller."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import reb_dist
from reb_dist.core.defectmaker import (
    FILLS,
    SHAPES,
    DefectMaker,
    as_rgb,
    blend,
    color_jitter,
    cut_paste,
    derive_seed,
    dihedral,
    load_saliency_folder,
    paste,
    random_noise,
    sample_centre,
    saliency_region,
    soften,
    spectral_residual,
    spectral_residual_saliency,
    synthesize,
)
from reb_dist.core.defectmaker.maker import CLUMP_WEIGHT_RANGE, SOLID_WEIGHT_RANGE, fuse_radii

GOOD = Path(reb_dist.__file__).parent / "sample_data" / "mvtec_ad_256" / "bottle" / "train" / "good"
IMAGE_PATH = GOOD / "000.png"
SOURCE_PATH = GOOD / "014.png"


def _load(path: Path, mode: str = "RGB") -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert(mode))


RGB = _load(IMAGE_PATH)
SOURCE = _load(SOURCE_PATH)
GRAY = _load(IMAGE_PATH, "L")  # HxW, single channel
ODD = np.asarray(Image.fromarray(RGB).resize((177, 301), Image.BICUBIC))  # 301 rows x 177 columns
IMAGES = {"rgb": RGB, "gray": GRAY, "odd": ODD}


def _radius_grid(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)


def _bbox(mask: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.image.tobytes())
        h.update(s.mask.tobytes())
        h.update(json.dumps(s.meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# every shape x fill x fusing, on a colour, a grey and an odd-sized image


@pytest.mark.parametrize("image_kind", sorted(IMAGES))
@pytest.mark.parametrize("fusing", ["paste", "blend"])
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_combination_changes_only_the_shape(shape, fill, fusing, image_kind):
    raw = IMAGES[image_kind]
    image = as_rgb(raw)
    gray = image_kind == "gray"
    h, w = image.shape[:2]
    blur_r = fuse_radii(h, w)[2]
    weights = CLUMP_WEIGHT_RANGE if shape == "bezier_clump" else SOLID_WEIGHT_RANGE
    for seed in range(3):
        centre = sample_centre(np.random.default_rng(1000 + seed), np.ones((h, w), dtype=bool))
        out, mask, meta = synthesize(np.random.default_rng(seed), image, shape, fill, fusing, centre,
                                     SOURCE if fill == "cut_paste" else None, weights, gray)
        # the hard shape is the first thing drawn from the generator: replay it
        hard = SHAPES[shape](np.random.default_rng(seed), h, w, centre)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert mask.dtype == np.float32 and mask.shape == (h, w)
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        assert hard.sum() >= 4 and (mask > 0).any()
        changed = (out != image).any(axis=2)
        assert changed.any(), "a defect class must change the image"
        if fusing == "paste":
            assert np.array_equal(mask > 0, hard)
            assert np.array_equal(out[~hard], image[~hard])  # byte-identical outside the shape
        else:
            assert np.array_equal(out[mask == 0], image[mask == 0])
            near = ndimage.binary_dilation(hard, structure=np.ones((2 * blur_r + 1,) * 2, dtype=bool))
            assert not (mask > 0)[~near].any(), "soft mask leaks beyond the blur radius"
            assert not changed[~near].any()
        if gray:
            assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
        assert meta["shape"] == shape and meta["fill"] == fill and meta["fusing"] == fusing
        y0, y1, x0, x1 = meta["bbox"]
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w


# ---------------------------------------------------------------------------------------------------
# shape statistics


def _draws(name: str, n: int = 50, size: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [SHAPES[name](rng, size, size, (size // 2, size // 2)) for _ in range(n)]


@pytest.mark.parametrize("name", ["rectangle", "bezier"])
def test_box_shapes_follow_cutpaste_area_and_aspect(name):
    fractions, aspects = [], []
    for m in _draws(name):
        bh, bw = _bbox(m)
        fractions.append(bh * bw / m.size)
        aspects.append(bw / bh)
        assert ndimage.label(m)[1] == 1  # one solid piece
    assert 0.01 <= min(fractions) and max(fractions) <= 0.2
    assert np.mean(fractions) == pytest.approx(0.085, abs=0.03)  # U[0.02, 0.15] has mean 0.085
    assert 1 / 3.6 <= min(aspects) and max(aspects) <= 3.6
    assert min(aspects) < 0.8 and max(aspects) > 1.25  # both orientations occur


def test_bezier_is_a_smooth_blob_not_its_box():
    fill = [m.sum() / np.prod(_bbox(m)) for m in _draws("bezier")]
    assert 0.4 < np.mean(fill) < 0.9  # a curved outline, neither a box (1.0) nor a sliver


@pytest.mark.parametrize("name,max_area", [("rectangle_scar", 16 * 25), ("bezier_scar", 21 * 30)])
def test_scars_are_small_and_thin(name, max_area):
    elong = []
    for m in _draws(name):
        assert 4 <= m.sum() <= 1.15 * max_area  # rasterisation adds at most an outline
        ys, xs = np.nonzero(m)
        ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))
        elong.append(np.sqrt(ev[1] / max(ev[0], 1e-9)))
    assert np.median(elong) > 1.4  # elongated, not round
    big = [m.sum() for m in _draws(name, n=20, size=512)]
    small = [m.sum() for m in _draws(name, n=20, size=256)]
    assert np.mean(big) > 2.5 * np.mean(small)  # sizes given at 256 px scale with the image


def test_clump_is_several_pieces_inside_a_bezier_box():
    pieces, fractions = [], []
    for m in _draws("bezier_clump"):
        pieces.append(ndimage.label(m)[1])
        bh, bw = _bbox(m)
        fractions.append(bh * bw / m.size)
    assert np.mean(pieces) >= 3
    assert max(fractions) <= 0.2


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("size", [(8, 8), (301, 177)])
def test_shapes_are_never_empty_even_at_corners(name, size):
    h, w = size
    rng = np.random.default_rng(3)
    for centre in [(0, 0), (h - 1, w - 1), (0, w - 1), (h // 2, w // 2)]:
        for _ in range(5):
            m = SHAPES[name](rng, h, w, centre)
            assert m.shape == (h, w) and m.dtype == bool and m.sum() >= min(4, h * w)
    with pytest.raises(ValueError):
        SHAPES[name](rng, h, w, (h, 0))


# ---------------------------------------------------------------------------------------------------
# fills and fusing


def test_random_noise_is_coarse_uniform_noise_in_range():
    rng = np.random.default_rng(0)
    means = []
    for _ in range(30):
        f = random_noise(rng, 40, 60)
        assert f.dtype == np.uint8 and f.shape == (40, 60, 3)
        means.append(f.reshape(-1, 3).mean(axis=0))
        assert f.min() >= 50 - 45 and f.max() <= 190 + 45
    means = np.array(means)
    assert means.min() >= 45 and means.max() <= 195
    assert means.std() > 20  # means really vary between draws


def test_cut_paste_is_a_crop_of_the_source():
    rng = np.random.default_rng(0)
    src = SOURCE[:40, :50]
    crop = cut_paste(rng, src, 10, 20)
    assert crop.shape == (10, 20, 3)
    hits = [(y, x) for y in range(31) for x in range(31) if np.array_equal(src[y:y + 10, x:x + 20], crop)]
    assert hits
    assert cut_paste(rng, SOURCE[:5, :5], 30, 30).shape == (30, 30, 3)  # small sources are resized up


def test_color_jitter_is_light():
    rng = np.random.default_rng(0)
    for _ in range(10):
        j = color_jitter(rng, RGB)
        assert j.shape == RGB.shape and j.dtype == np.uint8
        assert np.abs(j.astype(int) - RGB.astype(int)).mean() < 0.15 * 255
    assert np.array_equal(color_jitter(rng, RGB, strength=0.0), RGB)


def test_paste_and_blend_formulas():
    image = np.full((20, 20, 3), 100, np.uint8)
    fill = np.full((20, 20, 3), 200, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = paste(image, fill, mask)
    assert np.all(out[mask] == 200) and np.all(out[~mask] == 100)
    assert np.all(paste(image, fill, mask, weight=0.5)[mask] == 150)
    out, soft = blend(np.random.default_rng(0), image, fill, mask)
    assert soft.max() == pytest.approx(1.0) and soft[10, 10] == pytest.approx(1.0)
    assert 0 < soft[5, 5] < 1  # the edge is soft
    assert np.array_equal(out[soft == 0], image[soft == 0])
    out, soft = blend(np.random.default_rng(0), image, fill, mask, weight_range=(0.5, 0.5))
    assert 140 <= out[10, 10, 0] <= 150
    thin = np.zeros((20, 20), bool)
    thin[10, 2:18] = True  # erosion would delete a 1-px line: it is blurred as is instead
    assert soften(thin)[10, 10] > 0


# ---------------------------------------------------------------------------------------------------
# determinism and the 7-way batch


def test_same_seed_same_sample_different_seed_different():
    dm = DefectMaker()
    for c in range(1, dm.num_classes):
        a = dm.make(RGB, c, 123, SOURCE)
        b = dm.make(RGB.copy(), c, 123, SOURCE.copy())
        assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
        assert a.meta == b.meta and a.class_id == b.class_id == c
        other = dm.make(RGB, c, 124, SOURCE)
        assert other.image.tobytes() != a.image.tobytes()


def test_samples_are_identical_in_a_fresh_process():
    dm = DefectMaker()
    here = _digest(dm.sample_all(RGB, 42, SOURCE))
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import test_defectmaker as t; "
        "from reb_dist.core.defectmaker import DefectMaker; "
        "print(t._digest(DefectMaker().sample_all(t.RGB, 42, t.SOURCE)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == here


def test_sample_all_gives_one_sample_per_class():
    dm = DefectMaker()
    samples = dm.sample_all(RGB, 5, SOURCE)
    assert [s.class_id for s in samples] == list(range(7))
    assert [s.meta["class_name"] for s in samples] == dm.classes
    normal = samples[0]
    assert not normal.mask.any() and normal.meta["shape"] is None
    # class 0 is the base image with only the augmentation applied
    expected = dm.augment(np.random.default_rng(derive_seed(5, 0)), RGB)
    assert np.array_equal(normal.image, expected)
    for s in samples[1:]:
        assert s.image.shape == (256, 256, 3) and s.mask.shape == (256, 256)
        assert (s.mask > 0).any()
        base = dm.augment(np.random.default_rng(derive_seed(5, s.class_id)), RGB)
        assert np.array_equal(s.image[s.mask == 0], base[s.mask == 0])  # augmentation, then the defect
        assert (s.image != base).any()
    # the same as calling make with the derived seeds
    single = dm.make(RGB, 3, derive_seed(5, 3), SOURCE)
    assert single.image.tobytes() == samples[3].image.tobytes() and single.meta == samples[3].meta
    assert len({derive_seed(5, c) for c in range(7)}) == 7


def test_without_augmentation_class_zero_is_the_input():
    dm = DefectMaker(augmentation=False, image_size=None)
    for raw in (RGB, ODD):
        samples = dm.sample_all(raw, 1, SOURCE)
        assert np.array_equal(samples[0].image, raw)
        assert all(s.image.shape == raw.shape for s in samples)


def test_augment_is_jitter_plus_one_of_eight_dihedral_transforms():
    dm = DefectMaker()
    seen = set()
    for seed in range(40):
        k = dm.make(RGB, 0, seed).meta["dihedral"]
        seen.add(k)
    assert seen == set(range(8))
    a = np.arange(12).reshape(3, 4)
    transforms = {dihedral(a, k).tobytes() + bytes(dihedral(a, k).shape) for k in range(8)}
    assert len(transforms) == 8


def test_inputs_are_brought_to_the_working_size_and_gray_stays_gray():
    dm = DefectMaker(image_size=128)
    s = dm.make(ODD, 2, 0, SOURCE)
    assert s.image.shape == (128, 128, 3) and s.mask.shape == (128, 128)
    g = DefectMaker().sample_all(GRAY, 0, SOURCE)
    for s in g:
        assert s.image.shape == (256, 256, 3)
        assert np.array_equal(s.image[..., 0], s.image[..., 1]) and np.array_equal(s.image[..., 1], s.image[..., 2])


def test_bad_arguments_are_refused():
    dm = DefectMaker()
    with pytest.raises(ValueError):
        dm.make(RGB, 7, 0)
    with pytest.raises(ValueError):
        dm.make(RGB, 1, -1)
    with pytest.raises(ValueError):
        DefectMaker(task="draem")
    with pytest.raises(ValueError):
        DefectMaker(saliency="/no/such/folder")
    with pytest.raises(ValueError):
        DefectMaker(blend_prob=1.5)


# ---------------------------------------------------------------------------------------------------
# saliency


def test_saliency_marks_the_bottle_not_the_background():
    for path in (IMAGE_PATH, SOURCE_PATH):
        image = _load(path)
        sal = spectral_residual_saliency(image)
        assert sal.dtype == np.float32 and sal.shape == image.shape[:2]
        assert sal.min() >= 0.0 and sal.max() <= 1.0
        r = _radius_grid(*sal.shape)
        centre, corners = sal[r < 0.25 * sal.shape[0]].mean(), sal[r > 0.5 * sal.shape[0]].mean()
        assert centre > 0.5 and corners < 0.1 and centre > 5 * corners
        region = saliency_region(sal)
        assert 0.3 < region.mean() < 0.95
        assert region[r > 0.5 * sal.shape[0]].mean() < 0.01  # at most a sliver of the rim's blur
    # why the colour-contrast term: spectral residual alone marks the rim, not the uniform dark mouth
    sr = spectral_residual(RGB)
    assert sr[24:40, 24:40].mean() < 0.2


def test_saliency_map_has_odd_image_size_and_gray_works():
    assert spectral_residual_saliency(ODD).shape == (301, 177)
    assert spectral_residual_saliency(GRAY).shape == (256, 256)


def test_defects_are_centred_on_the_salient_region():
    dm = DefectMaker(augmentation=False)
    r = _radius_grid(256, 256)
    region = saliency_region(spectral_residual_saliency(RGB))
    for seed in range(20):
        s = dm.make(RGB, 1 + seed % 6, seed, SOURCE)
        cy, cx = s.meta["centre"]
        assert region[cy, cx] and r[cy, cx] < 0.5 * 256
        assert s.meta["saliency"] == "spectral"


def test_whole_mode_allows_centres_anywhere():
    assert saliency_region(spectral_residual_saliency(RGB), mode="whole").all()
    dm = DefectMaker(saliency="whole", augmentation=False)
    r = _radius_grid(256, 256)
    centres = [dm.make(RGB, 2, seed, SOURCE).meta["centre"] for seed in range(60)]
    assert any(r[cy, cx] > 0.5 * 256 for cy, cx in centres)  # some land on the plain corners
    assert all(dm.make(RGB, 2, s).meta["saliency"] == "whole" for s in range(2))


def test_tiny_salient_region_falls_back_to_the_whole_image():
    sal = np.zeros((64, 64), np.float32)
    sal[3, 3] = 1.0
    assert saliency_region(sal).all()
    rng = np.random.default_rng(0)
    region = np.zeros((5, 7), bool)
    region[4, 6] = True
    assert sample_centre(rng, region) == (4, 6)


def test_saliency_folder_is_used_and_missing_maps_fall_back(tmp_path):
    quadrant = np.zeros((64, 64), np.uint8)  # maps may have any size: resized to the image
    quadrant[:32, :32] = 255
    Image.fromarray(quadrant).save(tmp_path / "000.png")
    np.save(tmp_path / "014.npy", quadrant.astype(np.float64) * 3.0)  # .npy is min-max normalised
    loaded = load_saliency_folder(tmp_path, IMAGE_PATH)
    assert loaded.shape == (256, 256) and loaded[:120, :120].min() == 1.0 and loaded[136:, 136:].max() == 0.0
    assert load_saliency_folder(tmp_path, SOURCE_PATH, size=(100, 50)).shape == (100, 50)
    assert load_saliency_folder(tmp_path, GOOD / "028.png") is None

    dm = DefectMaker(saliency=tmp_path)  # with augmentation: the map turns with the image
    top_left = np.zeros((256, 256), bool)
    top_left[:128, :128] = True
    for seed in range(15):
        s = dm.make(RGB, 1 + seed % 6, seed, SOURCE, image_path=IMAGE_PATH)
        cy, cx = s.meta["centre"]
        assert s.meta["saliency"] == "folder"
        assert dihedral(top_left, s.meta["dihedral"])[cy, cx]
    missing = dm.make(RGB, 1, 0, SOURCE, image_path=GOOD / "028.png")
    assert missing.meta["saliency"] == "spectral-fallback"
    assert dm.make(RGB, 1, 0, SOURCE).meta["saliency"] == "spectral-fallback"  # no path given
    given = dm.make(RGB, 1, 0, SOURCE, saliency_map=quadrant / 255.0, image_path=GOOD / "028.png")
    assert given.meta["saliency"] == "given"


# ---------------------------------------------------------------------------------------------------
# tasks


def test_class_lists_of_the_three_tasks():
    assert DefectMaker("defectmaker").classes == [
        "normal",
        "bezier+cut_paste", "bezier+noise",
        "bezier_scar+cut_paste", "bezier_scar+noise",
        "bezier_clump+cut_paste", "bezier_clump+noise",
    ]
    assert DefectMaker("cutpaste").classes == ["normal", "rectangle+cut_paste", "rectangle_scar+cut_paste"]
    assert DefectMaker("noise").classes == ["normal", "bezier+noise", "bezier_scar+noise", "bezier_clump+noise"]


def test_cutpaste_task_pastes_rectangles_anywhere():
    dm = DefectMaker("cutpaste")
    samples = [s for seed in range(6) for s in dm.sample_all(RGB, seed, SOURCE)[1:]]
    assert {s.meta["shape"] for s in samples} == {"rectangle", "rectangle_scar"}
    assert all(s.meta["fusing"] == "paste" and s.meta["saliency"] == "whole" for s in samples)
    assert all(set(np.unique(s.mask)) <= {0.0, 1.0} for s in samples)


def test_noise_task_uses_noise_only_and_blends_about_half():
    dm = DefectMaker("noise")
    samples = [s for seed in range(20) for s in dm.sample_all(RGB, seed)[1:]]
    assert {s.meta["fill"] for s in samples} == {"noise"}
    blended = np.mean([s.meta["fusing"] == "blend" for s in samples])
    assert 0.3 < blended < 0.7
    clump_w = [s.meta["weight"] for s in samples if s.meta["shape"] == "bezier_clump"]
    assert min(clump_w) >= 0.5 and max(clump_w) <= 1.0 and min(clump_w) < 0.9
    assert all(s.meta["weight"] == 1.0 for s in samples if s.meta["shape"] != "bezier_clump")
