"""An exported model (ONNX, TorchScript) scores like the in-process Detector: image scores, maps,
normalised scores and flags; `reb export` and `reb predict -m file.onnx` round trip; methods the
module cannot compute are refused by name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reb_dist.cli import main
from reb_dist.export.build import ExportError, build_module
from reb_dist.export.runtime import OUTPUT_NAMES, load_exported, read_rgb, resize
from reb_dist.export.writer import save_torchscript
from reb_dist.io.data import preprocess, read_image
from reb_dist.io.model_file import load_model
from tests.unit.export.conftest import scoring_as, skip_without_onnx

RTOL = 1e-4  # scores; maps: 1e-4 of their largest value


def _check_like(reference, scores, maps, normalised=None, flags=None):
    ref_scores = np.array([p.score for p in reference])
    ref_maps = np.stack([p.pixel_map for p in reference])
    np.testing.assert_allclose(scores, ref_scores, rtol=RTOL)
    np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=RTOL * np.abs(ref_maps).max())
    if normalised is not None:
        np.testing.assert_allclose(normalised, [p.normalised_score for p in reference], rtol=0, atol=1e-5)
        assert list(flags) == [p.anomalous for p in reference]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_file_scores_like_the_detector(fmt, exported, reference, export_paths):
    if fmt == "onnx":
        skip_without_onnx()
    model = load_exported(exported[fmt])
    result = model.score_files(export_paths, batch_size=3)  # batches of 3 and 1: the batch axis is free
    assert result.scores.shape == (4,) and result.maps.shape == (4, 256, 256)
    _check_like(reference, result.scores, result.maps, result.normalised_scores, result.anomalous)
    assert list(result.anomalous).count(True) == 2  # the threshold lies between the 2nd and 3rd highest


def test_runtime_reads_images_as_the_detector_does(export_paths):
    """The runtime's uint8 resize, normalised inside the module, is the in-process preprocess."""
    image = read_rgb(export_paths[2])
    np.testing.assert_array_equal(image, read_image(export_paths[2]))
    inside = (torch.from_numpy(resize(image, 256).copy()).float().permute(2, 0, 1) / 255.0
              - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(inside, preprocess(image, 256), rtol=0, atol=1e-6)


def _images(paths):
    return torch.from_numpy(np.stack([resize(read_rgb(p), 256) for p in paths]))


@pytest.fixture(scope="module")
def features(small_detector, export_paths):
    """In-process features of two of the images (one good, one broken), extracted once."""
    paths = export_paths[1:3]
    batch = torch.stack([preprocess(read_image(p), small_detector.image_size) for p in paths])
    return paths, small_detector.extract([batch])


@pytest.mark.parametrize("changes", [
    dict(map_method="knn:k=3"),  # decoupled: LDKNN image score, KNN map
    dict(map_method="ldknn:k=3,alpha=0.2", image_score="max", sigma=2.0),  # an LDKNN map at its own K
    dict(methods=["knn"], k=4),
    dict(methods=["nn1"], squared=False, sigma=0.0),
], ids=["ldknn+map:knn", "ldknn+map:ldknn", "knn", "nn1-plain-l2"])
def test_module_scores_other_methods_like_the_detector(changes, small_detector, features, reference, tmp_path):
    paths, feats = features
    with scoring_as(small_detector, **changes) as detector:
        method = detector.default_method
        expected = detector.score_features(feats, [method])[method]
        module = build_module(detector)
        with torch.no_grad():
            if changes.get("map_method", "").startswith("knn"):  # a decoupled method through a TorchScript file
                loaded = torch.jit.load(str(save_torchscript(module, tmp_path / "m.pt")))
                out = loaded(_images(paths))
                assert list(out) == list(OUTPUT_NAMES)  # named, in order, as the ONNX file's outputs
                scores, normalised, flags, maps = (out[name].numpy() for name in OUTPUT_NAMES)
            else:
                scores, normalised, flags, maps = (t.numpy() for t in module(_images(paths)))
        expected_maps = detector.pixel_maps(expected.patch_maps)
    np.testing.assert_allclose(scores, expected.image_scores, rtol=RTOL)
    np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=RTOL * np.abs(expected_maps).max())
    assert np.isnan(normalised).all() and not flags.any()  # no calibration: nothing normalised or flagged
    if "map_method" in changes:  # the map is the map method's, not the image method's own (reference)
        assert not np.allclose(maps[0], reference[1].pixel_map, rtol=1e-2)


@pytest.mark.parametrize("changes, named", [
    (dict(methods=["lof"]), "lof(k=5)"),
    (dict(map_method="gde"), "gde"),
])
def test_unsupported_method_is_refused_by_name(changes, named, small_detector):
    with scoring_as(small_detector, **changes) as detector, pytest.raises(ExportError) as err:
        build_module(detector, "bottle.safetensors")
    assert f"bottle.safetensors: scoring method '{named}' cannot be exported" in str(err.value)
    assert "ldknn, knn, nn1, kthnn" in str(err.value)


def test_reb_export_writes_metadata_and_reb_predict_scores_with_the_file(exported, model_file, export_paths,
                                                                        tmp_path, capsys):
    skip_without_onnx()
    meta = load_exported(exported["onnx"]).metadata
    assert meta["image_size"] == 256 and meta["input"]["dtype"] == "uint8" and "bicubic" in meta["preprocessing"]
    assert meta["method"] == "ldknn(k=5,alpha=0.7)" and meta["calibration"]["quantile"] == 0.6
    rows = {}
    for name, model in (("in-process", model_file), ("onnx", exported["onnx"])):
        assert main(["predict", "-m", str(model), *map(str, export_paths), "-o", str(tmp_path / name)]) == 0
        with open(tmp_path / name / "scores.csv", newline="") as f:
            rows[name] = list(csv.DictReader(f))
        assert len(list((tmp_path / name).glob("*_heatmap.png"))) == 4
    assert [r["image"] for r in rows["onnx"]] == [r["image"] for r in rows["in-process"]]
    assert [r["anomalous"] for r in rows["onnx"]] == [r["anomalous"] for r in rows["in-process"]]
    for column, atol in (("score", 0.0), ("normalised_score", 1e-6)):  # normalised: in [0, 1], 0 where clipped
        np.testing.assert_allclose([float(r[column]) for r in rows["onnx"]],
                                   [float(r[column]) for r in rows["in-process"]], rtol=RTOL, atol=atol)


def test_reb_export_refuses_a_missing_model_and_an_unexported_file(tmp_path, capsys):
    assert main(["export", "-m", str(tmp_path / "none.safetensors"), "--format", "onnx"]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    (tmp_path / "lone.onnx").write_bytes(b"not a model")
    assert main(["predict", "-m", str(tmp_path / "lone.onnx"), str(tmp_path)]) == 2
    assert "lone.onnx.json: the exported model's metadata cannot be read" in capsys.readouterr().err


def test_adaptive_aggregation_exports_to_onnx_with_the_same_features(small_detector, tmp_path):
    """PatchCore's "adaptive" aggregation pools to sizes ONNX cannot (adaptive_avg_pool1d 360 -> 64):
    the exported module pools with fixed matrices, to the same features."""
    from reb_dist.core.features import PatchFeatures
    from reb_dist.core.ldknn import ScoringMethod
    from reb_dist.export.module import ExportableFeatures, ExportedDetector
    from reb_dist.export.writer import save_onnx

    original = PatchFeatures(small_detector.backbone.model, "adaptive", layer_dim=64, target_dim=48).eval()
    features = ExportableFeatures(original, small_detector.backbone.channels)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = images.float().permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        expected = original(x)
        assert expected.shape == (2, 48, 8, 8)
        torch.testing.assert_close(features(x), expected, rtol=1e-5, atol=1e-5)
    skip_without_onnx()
    import onnxruntime

    knn = ScoringMethod("knn", 3, 1.0, True)
    bank = np.random.default_rng(0).normal(size=(50, 48)).astype(np.float32)
    module = ExportedDetector(features, bank, knn, knn, {}, "max", 1.0, 64).eval()
    with torch.no_grad():
        scores = module(images)[0].numpy()
    session = onnxruntime.InferenceSession(str(save_onnx(module, tmp_path / "adaptive.onnx")))
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], scores, rtol=RTOL)


def test_reb_export_never_overwrites_its_model_and_replaces_an_output_only_with_force(model_file, exported, capsys):
    before = model_file.read_bytes()
    assert main(["export", "-m", str(model_file), "-f", "onnx", "-o", str(model_file)]) == 2
    assert "is the model being exported" in capsys.readouterr().err
    assert model_file.read_bytes() == before  # it once became ONNX bytes, exit 0
    # an existing output: refused before any work, named; --force replaces it
    pt = exported["torchscript"]
    stamp = pt.stat().st_mtime_ns
    assert main(["export", "-m", str(model_file), "-f", "torchscript", "-o", str(pt)]) == 2
    assert f"{pt}: exists" in capsys.readouterr().err and pt.stat().st_mtime_ns == stamp
    assert main(["export", "-m", str(model_file), "-f", "torchscript", "-o", str(pt), "--force"]) == 0
    assert pt.stat().st_mtime_ns != stamp
    assert main(["export", "-m", str(model_file), "-f", "torchscript", "-o", str(model_file), "--force"]) == 2
    assert model_file.read_bytes() == before  # --force never means the model itself


def test_reb_predict_into_its_input_folder_scores_the_images_not_its_own_overlays(model_file, export_paths, tmp_path,
                                                                                    capsys):
    import shutil

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, p in enumerate(export_paths):
        shutil.copy(p, imgs / f"{i}.png")
    for _ in range(2):  # the second run once scored the first run's overlays as 4 more images
        assert main(["predict", "-m", str(model_file), str(imgs), "-o", str(imgs)]) == 0
        rows = (imgs / "scores.csv").read_text().splitlines()[1:]
        assert len(rows) == len(export_paths) and not any("_heatmap" in r.split(",")[0] for r in rows)
    capsys.readouterr()
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert main(["predict", "-m", str(model_file), str(imgs), "-o", str(a_file)]) == 2  # before any work
    assert f"{a_file}: is a file" in capsys.readouterr().err


def test_reb_fit_into_a_file_that_is_not_a_folder_fails_before_building_the_bank(tmp_path, capsys, monkeypatch):
    from reb_dist.commands import fit as fit_command

    monkeypatch.setattr(fit_command, "fit_detector", lambda *a, **k: pytest.fail("the bank was built"))
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert main(["fit", "--no-mlflow", "--categories", "bottle", "-o", str(a_file)]) == 2
    assert f"--output {a_file}: is a file" in capsys.readouterr().err


def test_the_onnx_file_declares_its_output_shapes_and_carries_its_metadata(exported, model_file):
    """A deployer with only the .onnx: every output's shape as onnxruntime returns it (the map's rows
    were declared "batch"), and the preprocessing, threshold and version in the file's metadata."""
    skip_without_onnx()
    import onnx
    import onnxruntime as ort

    graph = onnx.load(exported["onnx"])
    size = load_model(model_file, "cpu").image_size
    declared = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    assert declared == {"scores": ["batch"], "normalised_scores": ["batch"], "anomalous": ["batch"],
                        "maps": ["batch", size, size]}
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": np.zeros((3, size, size, 3), np.uint8)})
    assert [list(o.shape) for o in outputs] == [[3], [3], [3], [3, size, size]]

    props = session.get_modelmeta().custom_metadata_map
    beside = json.loads(Path(f"{exported['onnx']}.json").read_text())
    assert props["reb_dist_version"] == beside["reb_dist_version"] and props["preprocessing"] == beside["preprocessing"]
    assert json.loads(props["image_size"]) == size and json.loads(props["input"])["dtype"] == "uint8"
    assert json.loads(props["threshold"]) == pytest.approx(beside["calibration"]["threshold"])


def test_torchs_deprecation_of_torchscript_is_said_once_in_reb_words(model_file, export_paths, tmp_path, caplog):
    # torch 2.14 deprecates torch.jit: `reb export -f torchscript` hid its FutureWarning with the tracer's,
    # and `reb predict -m file.pt` passed on torch's "switch to torch.export", which a reb user cannot act on
    import logging
    import warnings

    from reb_dist.cli import main
    from reb_dist.export.runtime import load_exported

    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        torch.jit.trace(torch.nn.Identity(), (torch.zeros(1),))
    deprecated = any(issubclass(w.category, FutureWarning) and "torch.jit" in str(w.message) for w in raw)
    said = "TorchScript, which torch now deprecates"
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        assert main(["export", "-m", str(model_file), "-f", "torchscript", "-o", str(tmp_path / "m.pt")]) == 0
        exported_note = caplog.text.count(said)
        caplog.clear()
        load_exported(tmp_path / "m.pt").score_files(export_paths[:1])
        loaded_note = caplog.text.count(said)
    assert (exported_note, loaded_note) == ((1, 1) if deprecated else (0, 0))
    assert not [w for w in passed if "torch.jit" in str(w.message)]  # torch's own words are not passed on
