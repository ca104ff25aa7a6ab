"""Inputs users get wrong, each reported instead of silently mishandled: images of the same name in
different folders, a bad image among good ones, a model evaluated with other settings or on another
category, a category folder given as the dataset root, and images too small for the feature grid."""

from __future__ import annotations

import csv
import logging
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from reb_dist.cli import main
from reb_dist.config import SAMPLE_DATA, RunConfig
from reb_dist.errors import ConfigError, DatasetError
from reb_dist.io.data import ImageDataset, Sample
from reb_dist.io.model_file import load_model, model_metadata
from reb_dist.commands import evaluate as evaluate_command
from reb_dist.pipelines.evaluate import categories_of, load_category
from reb_dist.pipelines.predict import predict
from reb_dist.commands.evaluate import evaluate
from reb_dist.commands.fit import fit
from reb_dist.commands.predict import predict_images
from tests.conftest import BOTTLE

TEST = SAMPLE_DATA / "bottle" / "test"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _png(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(path)
    return path


def _bad_images(folder):
    """A truncated PNG and a 1x1 one."""
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "cut.png"
    truncated.write_bytes((TEST / "good" / "000.png").read_bytes()[:200])
    return truncated, _png(folder / "dot.png", (1, 1))


# --- 1. overlays of images with the same name ---------------------------------------------------------------


def test_same_named_images_get_one_overlay_each(saved, workdir):
    _, model = saved
    a, b = workdir / "a" / "x.png", workdir / "b" / "x.png"
    for src, dst in ((TEST / "good" / "000.png", a), (TEST / "broken_large" / "000.png", b)):
        dst.parent.mkdir()
        shutil.copy(src, dst)
    predict_images(model, [a, b], workdir / "out", device="cpu")
    rows = _csv(workdir / "out" / "scores.csv")
    assert [r["image"] for r in rows] == [str(a), str(b)]  # each image by its full given path
    overlays = sorted(p.name for p in (workdir / "out").glob("*_heatmap.png"))
    assert len(overlays) == 2 and sorted(r["overlay"] for r in rows) == overlays
    first, second = (np.asarray(Image.open(workdir / "out" / r["overlay"])) for r in rows)
    assert not np.array_equal(first, second)  # neither overwrote the other
    assert rows[0]["overlay"] == "x_heatmap.png"  # a name without a clash stays as it was


# --- 2. a bad image among good ones --------------------------------------------------------------------------


def test_predict_scores_the_good_images_and_reports_the_bad_ones(saved, workdir, capsys):
    _, model = saved
    truncated, tiny = _bad_images(workdir / "bad")
    good = [TEST / "good" / "000.png", TEST / "broken_large" / "010.png"]
    rc = main(["predict", "-m", str(model), str(good[0]), str(truncated), str(tiny), str(good[1]),
               "-o", "pred", "--device", "cpu"])
    assert rc == 2
    out, err = capsys.readouterr()
    assert f"{truncated}: cannot be read as an image" in err and f"{tiny}: image is only 1x1 pixels" in err
    assert "2 of 4 images scored" in err
    rows = _csv(workdir / "pred" / "scores.csv")
    assert out == (workdir / "pred" / "scores.csv").read_text()  # stdout keeps the results it has
    assert [r["image"] for r in rows] == [str(good[0]), str(truncated), str(tiny), str(good[1])]
    assert [r["score"] == "" for r in rows] == [False, True, True, False]
    assert [bool(r["error"]) for r in rows] == [False, True, True, False]
    assert "cannot be read" in rows[1]["error"] and "1x1" in rows[2]["error"]
    assert {p.name for p in (workdir / "pred").glob("*_heatmap.png")} == {"000_heatmap.png", "010_heatmap.png"}


def test_predict_keeps_the_order_when_a_whole_batch_is_bad(detector, tmp_path):
    truncated, tiny = _bad_images(tmp_path)
    good = TEST / "good" / "000.png"
    out = predict(detector, [truncated, tiny, good], batch_size=2)  # the first batch has no good image
    assert [p.path for p in out] == [truncated, tiny, good]
    assert [p.error is not None for p in out] == [True, True, False]
    assert math.isnan(out[0].score) and out[0].pixel_map is None
    assert out[2].score == pytest.approx(predict(detector, [good])[0].score, rel=1e-6)


# --- 3. a model evaluated with other settings, or on another category ----------------------------------------


@pytest.fixture(scope="module")
def bottle_model(tmp_path_factory):
    """A model written by `fit` (4 training images, to be quick)."""
    cfg = RunConfig.load(None, BOTTLE + ["data.few_shot=4"])
    return fit(cfg, str(tmp_path_factory.mktemp("fit") / "bottle.safetensors"))["bottle"]


def test_fit_stores_the_category_and_dataset_root(bottle_model):
    meta = model_metadata(bottle_model)
    assert meta["category"] == "bottle" and meta["dataset_root"] == str(SAMPLE_DATA.absolute())
    assert load_model(bottle_model, device="cpu").bank is not None


def test_evaluate_refuses_a_category_the_model_was_not_fitted_on(bottle_model, workdir, capsys):
    rc = main(["evaluate", "--no-mlflow", "--categories", "capsule", "-m", str(bottle_model)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'bottle'" in err and "'capsule'" in err and str(bottle_model) in err
    with pytest.raises(ConfigError, match="bottle.*capsule"):
        evaluate(RunConfig.load(None, [*BOTTLE, "data.categories=[capsule]"]), bottle_model)


class _Scored(Exception):
    """Raised in place of scoring the test set: what these tests check happens before it."""


@pytest.fixture
def no_scoring(monkeypatch):
    def stop(*args, **kwargs):
        raise _Scored

    monkeypatch.setattr(evaluate_command, "evaluate_category", stop)


def test_evaluate_warns_for_each_setting_the_model_overrides(saved, no_scoring, tmp_path, caplog):
    _, model = saved  # saved without a category (as older files are): still loads, bottle is asked for
    assert "category" not in model_metadata(model)
    cfg = RunConfig.load(None, BOTTLE + ["backbone.name=resnet18", "scoring.methods=[knn]", "scoring.k=5",
                                         "scoring.alpha=0.5", "data.image_size=128", f"output_dir={tmp_path}"])
    with pytest.raises(_Scored):
        evaluate(cfg, model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # the methods are the user's to choose: scored from the model's bank, not warned of
    for setting, yours, models in (("backbone.name", "resnet18", "efficientnet_lite0"), ("scoring.k", "5", "9"),
                                   ("scoring.alpha", "0.5", "1.0"), ("data.image_size", "128", "256")):
        assert any(f"{setting}: your settings say {yours}, but {model} was fitted with {models}: the model's "
                   "value is used" in w for w in warnings), setting

    caplog.clear()
    with pytest.raises(_Scored):  # the settings the model was fitted with: nothing to say
        evaluate(RunConfig.load(None, BOTTLE + [f"output_dir={tmp_path}"]), model)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- 4. a category folder given as the dataset root ----------------------------------------------------------


@pytest.mark.parametrize("command", ["fit", "benchmark"])
def test_a_category_folder_as_root_says_what_to_pass(command, workdir, capsys):
    rc = main([command, "--no-mlflow", "--root", str(SAMPLE_DATA / "bottle")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{SAMPLE_DATA / 'bottle'}: no categories" in err
    assert f"this looks like a category folder: use --root {SAMPLE_DATA} --categories bottle" in err
    assert not (workdir / "outputs" / "models").exists()


def test_a_root_without_categories_is_an_error(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(DatasetError, match="no categories") as e:
        categories_of(RunConfig.load(None, [f"data.root={tmp_path}"]).data)
    assert e.value.path == tmp_path and "looks like" not in str(e.value)
    # a category asked for inside a category folder gets the same advice
    data = RunConfig.load(None, [f"data.root={SAMPLE_DATA / 'bottle'}", "data.categories=[bottle]"]).data
    with pytest.raises(DatasetError, match=f"use --root {SAMPLE_DATA} --categories bottle"):
        load_category(data, "bottle")


# --- 5. images too small for the feature grid ----------------------------------------------------------------


def test_images_smaller_than_the_feature_grid_are_refused(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA / "bottle", root / "bottle")
    tiny = root / "bottle" / "train" / "good" / "042.png"  # the 4th training image
    _png(tiny, (1, 1))
    with pytest.raises(DatasetError, match="1x1 pixels.*at least 32 px") as e:
        load_category(RunConfig.load(None, [f"data.root={root}"]).data, "bottle")
    assert e.value.path == tiny

    # without the file check the read refuses it too, before it can reach a bank
    split = load_category(RunConfig.load(None, [f"data.root={root}", "data.check_files=false"]).data, "bottle")
    with pytest.raises(DatasetError, match="1x1") as e:
        ImageDataset(split.train, 256, with_masks=False)[3]
    assert e.value.path == tiny

    narrow, enough = _png(tmp_path / "narrow.png", (300, 31)), _png(tmp_path / "enough.png", (32, 40))
    with pytest.raises(DatasetError, match="300x31"):
        ImageDataset([Sample(narrow, 0)], 256)[0]
    assert ImageDataset([Sample(enough, 0)], 256)[0]["image"].shape == (3, 256, 256)
    assert ImageDataset([Sample(narrow, 0)], 128)[0]["image"].shape == (3, 128, 128)  # 16 px is enough at 128
