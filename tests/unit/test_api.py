"""The public Python API (reb_dist.api) on the bundled bottle images: a small model fitted once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import reb_dist
from reb_dist.config import SAMPLE_DATA
from reb_dist.core.thresholds import normalise
from reb_dist.errors import DatasetError, RebError
from reb_dist.pipelines.evaluate import load_category, score_test_set

TEST = SAMPLE_DATA / "bottle" / "test"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "bottle.safetensors"
    fitted = reb_dist.Model.fit("sample", category="bottle", output=out, calibrate=True,
                                settings=["data.few_shot=6", "tracking.enabled=false", "cache.enabled=false",
                                          "backbone.device=cpu", "scoring.methods=[ldknn]"])
    yield fitted
    fitted.close()


@pytest.fixture(scope="module")
def test_set(model):
    """The bottle test samples and the model's predictions of their files."""
    test = load_category(reb_dist.DataConfig(root="sample", categories=["bottle"]), "bottle").test
    return test, model.predict([s.image_path for s in test])


def test_import_reb_dist_stays_light_and_exports_the_api():
    code = ("import sys, reb_dist; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert {'Model', 'Predictions', 'load'} <= set(dir(reb_dist))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_predict_matches_the_test_set_scores_and_takes_paths_folders_pil_and_arrays(model, test_set):
    assert model.category == "bottle" and model.threshold is not None and model.path.is_file()
    test, result = test_set
    split = load_category(reb_dist.DataConfig(root="sample", categories=["bottle"]), "bottle")
    expected = score_test_set(model.detector, split, reb_dist.DataConfig()).methods[0].image_scores
    files = [s.image_path for s in test]
    assert len(result) == len(files) and result.paths == files
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5)  # the DataLoader path of evaluate
    assert result.maps.shape == (len(files), 256, 256) and result.maps.dtype == np.float32
    assert np.array_equal(result.flags, result.scores >= model.threshold)
    np.testing.assert_allclose(result.normalised_scores, normalise(result.scores, model.calibration))

    # a folder is its images, sorted; PIL images and arrays score as their files do
    good = sorted((TEST / "good").iterdir())
    rgb = np.asarray(Image.open(good[1]).convert("RGB"))
    mixed = model.predict([TEST / "good", Image.open(good[0]), rgb, rgb.astype(np.float32) / 255,
                           rgb[..., 0], rgb[None]])
    by_file = dict(zip(files, result.scores))
    want = [by_file[p] for p in good] + [by_file[good[0]]] + [by_file[good[1]]] * 2
    np.testing.assert_allclose(mixed.scores[:len(want)], want, rtol=1e-5)
    assert mixed.paths[len(good):] == [None] * 5
    assert mixed.scores[-2] != mixed.scores[-3]  # the grey image is scored as grey, not as the colour one
    np.testing.assert_allclose(mixed.scores[-1], by_file[good[1]], rtol=1e-5)  # (1, H, W, 3) is a batch


def test_threshold_given_and_no_calibration(model):
    files = sorted((TEST / "broken_large").iterdir())
    scores = model.predict(files).scores
    given = float(np.median(scores))
    result = model.predict(files, threshold=given)
    assert result.threshold == given and np.array_equal(result.flags, scores >= given)
    model.detector.calibration, saved = None, model.detector.calibration
    try:
        bare = model.predict(files)
        assert bare.flags is None and bare.normalised_scores is None and bare.threshold is None
    finally:
        model.detector.calibration = saved


def test_evaluate_a_test_set(model, test_set):
    metrics = model.evaluate("sample")
    test, result = test_set
    labels = [s.label for s in test]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, result.scores))
    assert {"pixel_auroc", "aupro"} <= set(metrics)
    with pytest.raises(RebError, match="cable"):
        model.evaluate(SAMPLE_DATA, category="cable")


def test_bad_images_are_refused_by_name(model, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(DatasetError, match="missing.png"):
        model.predict([TEST / "good" / "000.png", missing])
    with pytest.raises(DatasetError, match=r"image 1: array of shape \(4, 4, 2\)"):
        model.predict([TEST / "good" / "000.png", np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(DatasetError, match="image 0: .*only 4x4 pixels"):
        model.predict(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="outside"):
        model.predict(np.full((64, 64, 3), 2.0))
    with pytest.raises(DatasetError, match="no images found"):
        model.predict(tmp_path)
    with pytest.raises(TypeError, match="image 0"):
        model.predict([42])


SMALL_FIT = ["tracking.enabled=false", "backbone.device=cpu", "scoring.methods=[ldknn]", "data.image_size=128"]


def test_fit_from_good_images_alone_folders_and_arrays(tmp_path, capsys):
    """A user with only good images (no test set, no dataset layout): `reb fit --images` and
    `Model.fit(images=...)` from folders, files or arrays; calibrated on held-out images + DefectMaker."""
    from reb_dist.cli import main
    from reb_dist.io.model_file import model_metadata

    good = tmp_path / "my_bottles" / "train" / "good"
    good.mkdir(parents=True)
    train = sorted((SAMPLE_DATA / "bottle" / "train" / "good").glob("*.png"))[:10]
    for path in train:
        (good / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "m.safetensors"
    args = ["fit", "--images", str(tmp_path / "my_bottles"), "--calibrate", "-o", str(out)]
    assert main(args + [a for s in SMALL_FIT for a in ("--set", s)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out)]
    model = reb_dist.load(out)
    assert model_metadata(out)["category"] == "my_bottles"  # named by the folder above train/good
    assert model.threshold is not None  # calibrated without any test image
    # it tells a broken bottle from a good one it has not seen
    result = model.predict([TEST / "broken_large" / "000.png", TEST / "good" / "000.png"])
    assert result.scores[0] > result.scores[1]

    # the same from the API, images in memory: the same bank, so the same scores
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in train]
    from_arrays = reb_dist.Model.fit(images=arrays, category="bottles", output=tmp_path / "a.safetensors",
                                     settings=SMALL_FIT + ["scoring.k=9"], calibrate=True)
    assert model_metadata(tmp_path / "a.safetensors")["category"] == "bottles"
    again = from_arrays.predict([TEST / "broken_large" / "000.png", TEST / "good" / "000.png"])
    np.testing.assert_allclose(again.scores, result.scores, rtol=1e-4)
    # the arrays were kept beside the model as files, so its provenance still shows them after the fit
    kept = sorted((tmp_path / "a.images").glob("*.png"))
    assert len(kept) == len(train)
    np.testing.assert_array_equal(np.asarray(Image.open(kept[3])), arrays[3])
    assert Path(again.nearest[0].train_image).is_file()

    capsys.readouterr()
    assert main(["fit", "--images", str(good), "--selection", "s.json"]) == 2  # refused before any work
    assert "--images and --selection do not go together" in capsys.readouterr().err


def test_maps_at_the_input_resolution_and_the_nearest_training_patch(model, tmp_path):
    """A 640 x 480 image gets a 480 x 640 map beside the model's 256 x 256 one; a training image's
    hottest patch finds itself in the bank: the same file, the same cell, distance 0."""
    train = sorted((SAMPLE_DATA / "bottle" / "train" / "good").iterdir())
    in_bank = [p for p in train if str(p) in set(model.detector.train_images)][0]
    wide = np.asarray(Image.open(in_bank).convert("RGB").resize((640, 480)))
    result = model.predict([in_bank, wide])
    assert result.maps.shape[1:] == (256, 256)
    assert result.input_maps[0].shape == (256, 256) and result.input_maps[1].shape == (480, 640)
    back = np.asarray(Image.fromarray(result.input_maps[1]).resize((256, 256), Image.Resampling.BILINEAR))
    assert np.corrcoef(back.ravel(), result.maps[1].ravel())[0, 1] > 0.99  # the same map, resized
    own = result.nearest[0]
    assert own.train_image == str(in_bank) and own.train_cell == own.cell and own.distance < 1e-2
    assert own.grid == (32, 32) and 0 <= own.train_index < len(model.detector.train_images)
    # the provenance is in the file: a loaded model names the same patch
    with reb_dist.load(model.path) as loaded:
        again = loaded.predict(in_bank).nearest[0]
    assert (again.train_image, again.train_cell, again.cell) == (own.train_image, own.train_cell, own.cell)


def test_written_images_leave_no_half_written_folder(tmp_path):
    """A fit from arrays that fails keeps the images of the model fitted before it, and none of its own."""
    from reb_dist.api import written_images

    folder, image = tmp_path / "m.images", np.zeros((8, 8, 3), np.uint8)
    with written_images(folder, [image, image]) as paths:
        assert [p.name for p in paths] == ["000000.png", "000001.png"] and all(p.is_file() for p in paths)
    with pytest.raises(RuntimeError, match="fit failed"):
        with written_images(folder, [image] * 3):
            raise RuntimeError("fit failed")
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.images"]  # nothing set aside left behind
    with written_images(folder, [image, tmp_path / "elsewhere.png"]) as paths:
        assert paths[1] == tmp_path / "elsewhere.png"  # files are used where they are
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png"]
