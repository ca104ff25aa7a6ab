"""Dataset package: image modes, layouts, validation errors, and the torch Dataset, on tiny synthetic sets."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reb_dist
from reb_dist.io.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    Sample,
    check_split,
    few_shot,
    folder,
    image_size,
    list_categories,
    load_split,
    read_image,
    read_mask,
)
from reb_dist.errors import DatasetError

SAMPLE = Path(reb_dist.__file__).parent / "sample_data" / "mvtec_ad_256"
SIZE = (32, 24)  # W, H


def img(path: Path, size=SIZE, color=(10, 20, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def mask(path: Path, size=SIZE, value=255) -> Path:
    a = np.zeros((size[1], size[0]), np.uint8)
    a[2:6, 3:9] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """root/widget in MVTec AD layout: 3 train, 2 good test, crack x2 and scratch x1 with masks."""
    cat = tmp_path / "widget"
    for name in ("002", "000", "001"):
        img(cat / "train" / "good" / f"{name}.png")
    for name in ("000", "001"):
        img(cat / "test" / "good" / f"{name}.png")
        img(cat / "test" / "crack" / f"{name}.png")
        mask(cat / "ground_truth" / "crack" / f"{name}_mask.png")
    img(cat / "test" / "scratch" / "000.png")
    mask(cat / "ground_truth" / "scratch" / "000_mask.png")
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    (cat / "train" / "good" / "readme.txt").write_text("notes")
    (cat / "license.txt").write_text("CC")
    return tmp_path


def raises_naming(name: str, fn, *args, **kw) -> DatasetError:
    with pytest.raises(DatasetError) as e:
        fn(*args, **kw)
    assert name in str(e.value), str(e.value)
    return e.value


# --- reading images and masks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,color,expected",
    [
        ("L", 77, (77, 77, 77)),
        ("RGBA", (1, 2, 3, 0), (1, 2, 3)),  # alpha dropped, not composited
        ("LA", (90, 10), (90, 90, 90)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_read_image_modes(tmp_path, mode, color, expected):
    a = read_image(img(tmp_path / f"x_{mode}.{'jpg' if mode == 'CMYK' else 'png'}", mode=mode, color=color))
    assert a.dtype == np.uint8 and a.shape == (SIZE[1], SIZE[0], 3)
    assert tuple(a[0, 0]) == expected


def test_read_image_16bit_scales_by_bit_depth(tmp_path):
    a16 = np.array([[0, 257 * 100, 65535, 300]], np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    Image.fromarray(a16.astype(np.int32)).save(tmp_path / "g32.tif")  # mode "I"
    for name in ("g16.png", "g32.tif"):
        a = read_image(tmp_path / name)
        assert a.shape == (1, 4, 3) and a.dtype == np.uint8
        assert a[0, :, 0].tolist() == [0, 100, 255, 1]


def test_read_image_palette_and_odd_size(tmp_path):
    p = Image.new("P", (301, 177))
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.paste(1, (0, 0, 10, 10))
    p.save(tmp_path / "p.png")
    a = read_image(tmp_path / "p.png")
    assert a.shape == (177, 301, 3)
    assert tuple(a[0, 0]) == (200, 100, 50) and tuple(a[-1, -1]) == (0, 0, 0)
    assert image_size(tmp_path / "p.png") == (301, 177)


def test_read_image_bad_files(tmp_path):
    raises_naming("broken.png", read_image, truncated_png(tmp_path / "broken.png"))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    raises_naming("cut.jpg", read_image, tmp_path / "cut.jpg")
    (tmp_path / "text.png").write_text("not an image")
    e = raises_naming("text.png", read_image, tmp_path / "text.png")
    assert "cannot be read as an image" in e.problem
    (tmp_path / "empty.png").write_bytes(b"")
    raises_naming("empty.png", read_image, tmp_path / "empty.png")
    raises_naming("missing.png", read_image, tmp_path / "missing.png")
    raises_naming("missing.png", image_size, tmp_path / "missing.png")


def test_read_mask_thresholds_on_8bit_scale(tmp_path):
    Image.fromarray(np.array([[0, 100, 127, 128, 200, 255]], np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, False, True, True, True]]
    Image.fromarray(np.array([[257 * 127, 257 * 128]], np.uint16)).save(tmp_path / "m16.png")
    assert read_mask(tmp_path / "m16.png").tolist() == [[False, True]]
    img(tmp_path / "rgb.png", size=(2, 1), color=(0, 200, 0))
    assert read_mask(tmp_path / "rgb.png").tolist() == [[True, True]]
    m = read_mask(mask(tmp_path / "ok.png"), expected_size=SIZE)
    assert m.dtype == bool and m.shape == (SIZE[1], SIZE[0]) and m.sum() == 24


def test_read_mask_size_mismatch_and_folder_union(tmp_path):
    e = raises_naming("small.png", read_mask, mask(tmp_path / "small.png", size=(20, 20)), SIZE, image="a.png")
    assert "20x20" in e.problem and "32x24" in e.problem and "a.png" in e.problem
    d = tmp_path / "000"
    mask(d / "000.png")
    b = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    b[-1, -1] = 255
    Image.fromarray(b).save(d / "001.png")
    m = read_mask(d, SIZE)
    assert m.sum() == 25 and m[-1, -1]
    (tmp_path / "empty_dir").mkdir()
    raises_naming("empty_dir", read_mask, tmp_path / "empty_dir")


# --- layouts ----------------------------------------------------------------------------------------------


def test_mvtec_layout(mvtec):
    s = load_split("mvtec", mvtec, "widget")
    assert [p.image_path.name for p in s.train] == ["000.png", "001.png", "002.png"]
    assert len(s.test) == 5 and [t.label for t in s.test].count(1) == 3
    assert s.defect_types == ["crack", "scratch"] and s.has_masks and s.layout == "mvtec"
    for t in s.test:
        if t.label:
            assert t.mask_path == mvtec / "widget" / "ground_truth" / t.defect_type / f"{t.image_path.stem}_mask.png"
        else:
            assert t.defect_type == "good" and t.mask_path is None
    assert check_split(s) == 8 and check_split(s, deep=False) == 8
    assert list_categories("mvtec", mvtec) == ["widget"]


def test_mvtec_missing_masks(mvtec):
    (mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    e = raises_naming("001.png", load_split, "mvtec", mvtec, "widget")
    assert "001_mask.png" in e.problem
    s = load_split("mvtec", mvtec, "widget", require_masks=False)
    assert [t.mask_path is None for t in s.test if t.label] == [False, True, False]
    shutil.rmtree(mvtec / "widget" / "ground_truth")
    raises_naming("ground_truth", load_split, "mvtec", mvtec, "widget")
    s = load_split("mvtec", mvtec, "widget", require_masks=False)
    assert not s.has_masks and len(s.test) == 5


def _empty_train(cat: Path) -> None:
    for p in (cat / "train" / "good").glob("*.png"):
        p.unlink()


@pytest.mark.parametrize(
    "breakage,name",
    [
        (_empty_train, "good"),
        (lambda cat: (cat / "test" / "crack" / "notes.csv").write_text("a,b"), "notes.csv"),
        (lambda cat: shutil.rmtree(cat / "train"), "train"),
    ],
)
def test_mvtec_structure_errors(mvtec, breakage, name):
    breakage(mvtec / "widget")
    e = raises_naming(name, load_split, "mvtec", mvtec, "widget")
    if name == "good":
        assert "empty class folder" in e.problem  # the skipped .DS_Store and readme.txt do not count


def test_missing_category_lists_known(mvtec):
    e = raises_naming("gadget", load_split, "mvtec", mvtec, "gadget")
    assert "widget" in e.problem


def test_check_split_finds_corrupt_image_and_bad_mask(mvtec):
    cat = mvtec / "widget"
    truncated_png(cat / "test" / "good" / "001.png")
    s = load_split("mvtec", mvtec, "widget")
    e = raises_naming("001.png", check_split, s)
    assert "cannot be read" in e.problem
    mask(cat / "ground_truth" / "crack" / "000_mask.png", size=(20, 20))
    e = raises_naming("000_mask.png", check_split, load_split("mvtec", mvtec, "widget"))  # first in sample order
    assert "20x20" in e.problem and "1 other bad file" in e.problem and "001.png" in e.problem
    raises_naming("000_mask.png", check_split, s, deep=False)  # header read still catches the size


def test_loco_layout(tmp_path):
    cat = tmp_path / "juice"
    img(cat / "train" / "good" / "000.png")
    img(cat / "validation" / "good" / "000.png")
    img(cat / "test" / "good" / "000.png")
    for kind in ("logical_anomalies", "structural_anomalies"):
        img(cat / "test" / kind / "000.png")
        mask(cat / "ground_truth" / kind / "000" / "000.png")
    b = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    b[-1, -1] = 255
    Image.fromarray(b).save(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png")
    s = load_split("loco", tmp_path, "juice")
    assert [(t.label, t.defect_type, t.group) for t in s.test] == [
        (0, "good", ""), (1, "logical_anomalies", "logical"), (1, "structural_anomalies", "structural")]
    assert s.test[1].mask_path == cat / "ground_truth" / "logical_anomalies" / "000"
    assert read_mask(s.test[1].mask_path).sum() == 25 and read_mask(s.test[2].mask_path).sum() == 24
    assert len(s.extras["validation"]) == 1 and check_split(s) == 5


def test_btad_layout(tmp_path):
    cat = tmp_path / "01"
    for n in ("a", "b"):
        img(cat / "train" / "ok" / f"{n}.bmp")
    img(cat / "test" / "ok" / "c.bmp")
    img(cat / "test" / "ko" / "d.bmp")
    img(cat / "test" / "ko" / "e.png")
    mask(cat / "ground_truth" / "ko" / "d.png")
    mask(cat / "ground_truth" / "ko" / "e.bmp")
    s = load_split("btad", tmp_path, "01")
    assert len(s.train) == 2 and s.defect_types == ["ko"]
    assert [(t.label, t.mask_path and t.mask_path.name) for t in s.test] == [(1, "d.png"), (1, "e.bmp"), (0, None)]
    assert list_categories("btad", tmp_path) == ["01"] and check_split(s) == 5


def test_mvtec3d_layout(tmp_path):
    cat = tmp_path / "cookie"
    img(cat / "train" / "good" / "rgb" / "000.png")
    (cat / "train" / "good" / "xyz").mkdir()
    img(cat / "validation" / "good" / "rgb" / "000.png")
    img(cat / "test" / "good" / "rgb" / "000.png")
    mask(cat / "test" / "good" / "gt" / "000.png", value=0)
    img(cat / "test" / "hole" / "rgb" / "000.png")
    mask(cat / "test" / "hole" / "gt" / "000.png")
    (cat / "test" / "hole" / "xyz").mkdir()
    (cat / "test" / "hole" / "xyz" / "000.tiff").write_bytes(b"xyz")
    s = load_split("mvtec3d", tmp_path, "cookie")
    assert len(s.train) == 1 and len(s.extras["validation"]) == 1
    hole_mask = cat / "test" / "hole" / "gt" / "000.png"
    assert [(t.defect_type, t.mask_path) for t in s.test] == [("good", None), ("hole", hole_mask)]
    shutil.rmtree(cat / "test" / "hole" / "gt")
    raises_naming("gt", load_split, "mvtec3d", tmp_path, "cookie")


def test_folder_layout(tmp_path):
    img(tmp_path / "tr" / "a.png")
    img(tmp_path / "ok" / "b.jpg")
    img(tmp_path / "bad" / "c.png")
    img(tmp_path / "bad" / "dent" / "d.PNG")
    img(tmp_path / "bad" / "dent" / "e.png")
    mask(tmp_path / "masks" / "c.png")
    mask(tmp_path / "masks" / "dent" / "d_mask.png")
    s = folder(tmp_path / "tr", tmp_path / "ok", tmp_path / "bad", tmp_path / "masks", name="parts")
    assert s.name == "parts" and len(s.train) == 1
    assert [(t.label, t.defect_type, t.mask_path and t.mask_path.name) for t in s.test] == [
        (0, "good", None), (1, "anomalous", "c.png"), (1, "dent", "d_mask.png"), (1, "dent", None)]
    s2 = load_split("folder", tmp_path, train_dir="tr", test_normal_dir="ok", test_anomalous_dir="bad")
    assert len(s2.test) == 4 and not s2.has_masks and s2.name == tmp_path.name
    raises_naming("e.png", folder, tmp_path / "tr", tmp_path / "ok", tmp_path / "bad", tmp_path / "masks",
                  require_masks=True)


def test_load_split_errors(mvtec):
    with pytest.raises(ValueError, match="mvtec.*loco.*btad.*mvtec3d.*folder"):
        load_split("visa", mvtec, "widget")
    with pytest.raises(ValueError, match="widget"):
        load_split("mvtec", mvtec)
    raises_naming("nowhere", load_split, "mvtec", mvtec / "nowhere", "widget")


# --- torch dataset ----------------------------------------------------------------------------------------


def test_image_dataset(tmp_path):
    im = img(tmp_path / "a.png", size=(40, 30), color=(128, 128, 128))
    a = np.zeros((30, 40), np.uint8)
    a[:, 20:] = 200  # non-binary foreground on the right half
    Image.fromarray(a).save(tmp_path / "a_mask.png")
    ds = ImageDataset([Sample(im, 1, "x", tmp_path / "a_mask.png"), Sample(im, 0)], image_size=16)
    x = ds[0]
    assert x["image"].shape == (3, 16, 16) and x["image"].dtype == torch.float32
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x["image"][:, 5, 5], expected, atol=1e-4)
    assert x["mask"].shape == (1, 16, 16) and x["mask"].dtype == torch.float32
    assert set(x["mask"].unique().tolist()) == {0.0, 1.0}
    assert x["mask"][0, :, 8:].all() and not x["mask"][0, :, :8].any()
    assert x["label"] == 1 and x["index"] == 0
    assert ds[1]["mask"].sum() == 0 and ds[1]["label"] == 0 and ds[1]["index"] == 1
    assert ImageDataset(ds.samples, 16, with_masks=False)[0]["mask"].sum() == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].tolist() == [1, 0]


def test_few_shot(mvtec):
    s = load_split("mvtec", mvtec, "widget")
    assert [p.image_path.name for p in few_shot(list(reversed(s.train)), 2)] == ["000.png", "001.png"]
    with pytest.raises(ValueError):
        few_shot(s.train, 4)


# --- the shipped sample -----------------------------------------------------------------------------------


def test_shipped_bottle_sample():
    s = load_split("mvtec", SAMPLE, "bottle")
    assert list_categories("mvtec", SAMPLE) == ["bottle", "pill"]
    assert len(s.train) == 16 and len(s.test) == 15
    assert sum(t.label == 0 for t in s.test) == 6 and sum(t.label for t in s.test) == 9
    assert s.defect_types == ["broken_large", "broken_small", "contamination"]
    assert all(t.mask_path is not None and t.mask_path.is_file() for t in s.test if t.label)
    assert check_split(s) == 31
    ds = ImageDataset(s.test, image_size=64)
    assert ds[0]["label"] == 1 and ds[0]["mask"].sum() > 0 and ds[len(ds) - 1]["mask"].sum() == 0
