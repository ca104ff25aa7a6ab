"""Feature engines: ONNX Runtime gives torch's features, its graph is cached and rebuilt when stale,
one thread setting reaches torch, faiss and ONNX Runtime, a model scores alike under either engine,
and a reduced precision autocasts torch's forward pass on a GPU only."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest
import torch

from reb_dist.core.backbones import build_backbone
from reb_dist.core.feature_engines import (KEY_FIELD, TorchEngine, apply_threads, effective_precision, graph_key,
                                           onnxruntime_engine, resolve_engine, resolve_threads)
from reb_dist.core.features import PatchFeatures
from reb_dist.io.data.dataset import preprocess
from reb_dist.io.data.images import read_image
from reb_dist.io.model_file import load_model, save_model
from reb_dist.pipelines.predict import predict

SIZE = 128


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def images(cfg, split):
    return torch.stack([preprocess(read_image(s.image_path), SIZE) for s in split.test[:4]])


def engines(backbone, aggregation, folder):
    features = PatchFeatures(backbone.model, aggregation, 96, 128).eval()
    key = graph_key(backbone.name, backbone.fingerprint, aggregation, 96, 128, SIZE)
    return (TorchEngine(features, torch.device("cpu")),
            onnxruntime_engine(features, backbone.channels, key, SIZE, folder, 2), key)


@pytest.mark.parametrize("aggregation", ["avgpool", "adaptive"])
def test_onnxruntime_features_equal_torchs_within_1e4_relative(backbone, images, tmp_path, aggregation):
    torch_engine, ort_engine, _ = engines(backbone, aggregation, tmp_path)
    expected, got = torch_engine(images), ort_engine(images)
    assert got.shape == expected.shape == (4, SIZE // 8, SIZE // 8, 152 if aggregation == "avgpool" else 128)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # and batch by batch as by the whole: the batch axis is free
    np.testing.assert_allclose(np.concatenate([ort_engine(images[:1]), ort_engine(images[1:])]), got,
                               rtol=1e-5, atol=1e-6)


def test_the_graph_is_exported_once_and_rebuilt_when_stale_or_broken(backbone, images, tmp_path):
    _, first, key = engines(backbone, "avgpool", tmp_path)
    path = tmp_path / f"{key}.onnx"
    assert first.path == path and first.session.get_modelmeta().custom_metadata_map[KEY_FIELD] == key
    stamp = path.stat().st_mtime_ns
    _, again, _ = engines(backbone, "avgpool", tmp_path)
    assert path.stat().st_mtime_ns == stamp  # cached: not exported again
    # another graph under this key's name (e.g. copied by hand): its key differs, so it is rebuilt
    other = graph_key(backbone.name, backbone.fingerprint, "avgpool", 96, 128, SIZE * 2)
    onnxruntime_engine(PatchFeatures(backbone.model).eval(), backbone.channels, other, SIZE * 2, tmp_path, 1)
    os.replace(tmp_path / f"{other}.onnx", path)
    _, rebuilt, _ = engines(backbone, "avgpool", tmp_path)
    assert rebuilt.session.get_modelmeta().custom_metadata_map[KEY_FIELD] == key
    assert rebuilt(images).shape[1] == SIZE // 8
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    _, repaired, _ = engines(backbone, "avgpool", tmp_path)
    np.testing.assert_array_equal(repaired(images), rebuilt(images))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # nothing half-written left


def test_engine_choice(monkeypatch):
    assert resolve_engine("auto", torch.device("cpu")) == "onnxruntime"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="runs on CPU"):
        resolve_engine("onnxruntime", torch.device("cuda"))
    with pytest.raises(ValueError, match="must be one of"):
        resolve_engine("tensorrt", torch.device("cpu"))
    # without onnxruntime, auto falls back to torch and onnxruntime names what is missing
    monkeypatch.setattr("reb_dist.core.feature_engines.onnxruntime_available", lambda: False)
    assert resolve_engine("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="needs the onnxruntime and onnx packages"):
        resolve_engine("onnxruntime", torch.device("cpu"))


def test_one_thread_setting_reaches_torch_faiss_and_onnxruntime(backbone, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # as Ray sets it for a task's share of CPUs
        assert resolve_threads(0) == 3 and resolve_threads(2) == 2
        _, ort_engine, _ = engines(backbone, "avgpool", tmp_path)
        assert ort_engine.session.get_session_options().intra_op_num_threads == 2
    finally:
        apply_threads(before)


def test_a_saved_model_scores_alike_whichever_engine_extracts_its_features(detector, split, tmp_path):
    path = save_model(detector, tmp_path / "bottle.safetensors")
    images = [s.image_path for s in split.test]
    by_engine = {}
    for engine in ("torch", "onnxruntime"):
        loaded = load_model(path, "cpu", engine=engine, graph_folder=tmp_path / "onnx")
        assert loaded.engine_name == engine
        by_engine[engine] = predict(loaded, images)
    torch_scores = np.array([p.score for p in by_engine["torch"]])
    ort_scores = np.array([p.score for p in by_engine["onnxruntime"]])
    np.testing.assert_allclose(ort_scores, torch_scores, rtol=1e-4)
    assert np.argsort(ort_scores).tolist() == np.argsort(torch_scores).tolist()
    for a, b in zip(by_engine["torch"], by_engine["onnxruntime"]):
        np.testing.assert_allclose(b.pixel_map, a.pixel_map, rtol=1e-4, atol=1e-4 * np.abs(a.pixel_map).max())


def test_an_unwritable_graph_folder_falls_back_to_torch_with_a_warning(backbone, images, tmp_path, caplog):
    from reb_dist.core.detector import Detector
    from reb_dist.detectors import detector_scoring
    from reb_dist.config import ScoringConfig

    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    detector = Detector(backbone, detector_scoring(ScoringConfig()), SIZE, device="cpu", graph_folder=blocker / "onnx")
    assert detector.engine_name == "onnxruntime"
    features = detector.extract([images])
    assert detector.engine_name == "torch" and features.shape == (4, SIZE // 8, SIZE // 8, 152)
    assert "features run on torch" in caplog.text


@pytest.mark.parametrize("precision, rel", [("bf16", 0.1), ("fp16", 0.02)])
def test_a_reduced_precision_autocasts_the_torch_forward_pass_and_gives_float32(backbone, images, precision, rel):
    # on CPU, as the engine is asked (the detector asks for it only on a GPU); what a GPU does with it
    # bench/gpu_check.py measures
    features = PatchFeatures(backbone.model).eval()
    full = TorchEngine(features, torch.device("cpu"))(images[:2])
    reduced = TorchEngine(features, torch.device("cpu"), precision=precision)(images[:2])
    assert reduced.dtype == np.float32 and reduced.shape == full.shape
    diff = np.abs(reduced - full).max() / np.abs(full).max()
    assert 1e-5 < diff < rel  # rounded as the dtype rounds: not float32's result, not far from it
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchEngine(features, torch.device("cpu"), precision="fp8")


def test_precision_is_a_gpu_setting_and_keys_the_feature_cache_where_it_applies(backbone, images):
    from reb_dist.config import ScoringConfig
    from reb_dist.core.detector import Detector
    from reb_dist.detectors import detector_scoring
    from reb_dist.io.feature_cache import extraction_settings

    assert effective_precision("fp16", torch.device("cuda")) == "fp16"
    assert effective_precision("bf16", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="backbone.precision must be one of"):
        effective_precision("half", torch.device("cuda"))
    scoring = detector_scoring(ScoringConfig())
    full = Detector(backbone, scoring, SIZE, device="cpu", engine="torch")
    on_cpu = Detector(backbone, scoring, SIZE, device="cpu", engine="torch", precision="bf16")
    assert on_cpu.precision == "fp32"  # CPU computes float32: the same features, the same cache entries
    np.testing.assert_array_equal(on_cpu.extract([images[:2]]), full.extract([images[:2]]))
    assert extraction_settings(on_cpu) == extraction_settings(full)
    assert "precision" not in extraction_settings(full)  # float32 keys are those of caches written before
    on_cpu.precision = "fp16"  # as a GPU detector would hold it: its features are other features
    assert extraction_settings(on_cpu) == {**extraction_settings(full), "precision": "fp16"}
