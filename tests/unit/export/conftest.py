"""One small calibrated model (3 training bottles, a 10% coreset) and its ONNX and TorchScript exports,
made with `reb export` itself, shared by the export tests; in-process predictions to compare with."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest

from reb_dist.cli import main
from reb_dist.config import RunConfig
from reb_dist.core.thresholds import Calibration
from reb_dist.detectors import detector_scoring, detector_scoring_settings
from reb_dist.io.model_file import load_model, save_model
from reb_dist.pipelines.predict import predict

SETTINGS = ["data.categories=[bottle]", "data.few_shot=3", "backbone.device=cpu", "tracking.enabled=false",
            "cache.enabled=false", "bank.coreset_ratio=0.1", "scoring.methods=[ldknn]", "scoring.k=5",
            "scoring.alpha=0.7", "scoring.image_score=pool3max"]
# distinct stems; normal and anomalous
IMAGES = ["good/000.png", "good/011.png", "broken_large/019.png", "contamination/020.png"]


@pytest.fixture(scope="session")
def export_cfg():
    return RunConfig.load(None, SETTINGS)


@pytest.fixture(scope="session")
def export_paths(export_cfg):
    return [export_cfg.data.resolved_root() / "bottle" / "test" / name for name in IMAGES]


@pytest.fixture(scope="session")
def small_detector(export_cfg):
    from reb_dist.pipelines.evaluate import fit_detector, load_category

    return fit_detector(export_cfg, load_category(export_cfg.data, "bottle"))


@pytest.fixture(scope="session")
def model_file(small_detector, export_paths, tmp_path_factory):
    """The model saved with a calibration whose threshold lies between the 2nd and 3rd highest score."""
    scores = np.sort([p.score for p in predict(small_detector, export_paths)])
    assert scores[-3] < scores[-2]
    calibration = Calibration(threshold=float((scores[-3] + scores[-2]) / 2), method="quantile",
                              low=float(scores[0]), high=float(scores[-1]), source="test", quantile=0.6)
    small_detector.calibration = calibration
    return save_model(small_detector, tmp_path_factory.mktemp("model") / "bottle.safetensors")


@pytest.fixture(scope="session")
def reference(model_file, export_paths):
    """What the in-process path predicts with the saved model."""
    return predict(load_model(model_file, "cpu"), export_paths)


def onnx_installed() -> bool:
    """Whether the `export` extra's onnx (to write) and onnxruntime (to run) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def skip_without_onnx() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def exported(model_file):
    """{format: file} written by `reb export` (no "onnx" without the export extra)."""
    out = {}
    for fmt, name in (("onnx", "bottle.onnx"), ("torchscript", "bottle.pt")):
        if fmt == "onnx" and not onnx_installed():
            continue
        out[fmt] = model_file.parent / name
        assert main(["export", "-m", str(model_file), "--format", fmt, "-o", str(out[fmt])]) == 0
    return out


@contextmanager
def scoring_as(detector, **changes):
    """`detector` scoring as `changes` say, its fitted bank kept, without a calibration."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(detector, "scoring", detector_scoring(replace(detector_scoring_settings(detector), **changes)))
        mp.setattr(detector, "calibration", None)
        yield detector
