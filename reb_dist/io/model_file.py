"""Model files: a fitted detector's bank, densities and settings in one .safetensors file.

safetensors holds tensors plus JSON metadata and never unpickles anything. The backbone is not
stored: it is named, with the fingerprint of its weights, and checked when the model is loaded, so
a model never silently runs with other weights than it was fitted with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from reb_dist.version import __version__
from reb_dist.config import BackboneConfig, BankConfig, RunConfig, ScoringConfig
from reb_dist.core.detector import Detector
from reb_dist.detectors import build_detector
from reb_dist.core.ldknn import IndexFactory
from reb_dist.core.thresholds import Calibration
from reb_dist.errors import ConfigError, ModelFileError
from reb_dist.io.atomic import write_atomic
from reb_dist.io.tensor_files import read_tensors

MODEL_FORMAT = "reb-dist-model/1"


def save_model(detector: Detector, path: str | Path, density: np.ndarray | None = None,
               category: str | None = None, dataset_root: str | Path | None = None) -> Path:
    """Write a fitted detector's bank, densities and settings to `path` atomically.

    The detector's calibration (image threshold + normalisation range), when it has one, goes in
    the metadata as "calibration" (JSON of `Calibration.to_dict`); the category and dataset root
    the bank was fitted on, when given, as "category" and "dataset_root" (see `model_metadata`).

    Args:
        detector: a detector with a bank.
        path: the .safetensors file to write.
        density: every bank point's density for the detector's K; computed when not given.
        category: the category the bank was fitted on (a detector does not know it).
        dataset_root: the dataset root it came from.

    Returns:
        `path` as a Path.
    """
    if detector.bank is None:
        raise RuntimeError("nothing to save: the detector has no memory bank")
    if not {"backbone", "scoring"} <= set(detector.settings):  # what loading rebuilds the detector from
        raise RuntimeError("cannot save a detector made without its settings: build it with "
                           "reb_dist.detectors.build_detector")
    if density is None:
        density = detector.compute_density()
    metadata = {
        "format": MODEL_FORMAT,
        "reb_dist_version": __version__,
        "backbone": json.dumps(detector.settings["backbone"]),
        "backbone_weights": detector.backbone.weights_source,
        "backbone_fingerprint": detector.backbone.fingerprint,
        "scoring": json.dumps(detector.settings["scoring"]),
        "image_size": str(detector.image_size),
    }
    if category is not None:
        metadata["category"] = str(category)
    if dataset_root is not None:
        metadata["dataset_root"] = str(dataset_root)
    if detector.calibration is not None:
        metadata["calibration"] = json.dumps(detector.calibration.to_dict())
    metadata["settings_sha256"] = settings_digest(metadata)
    tensors = {"bank": detector.bank, "density": np.asarray(density, np.float32)}
    if detector.map_density_k is not None:  # a decoupled LDKNN map at its own K needs its own densities
        tensors["map_density"] = np.asarray(detector.compute_density(detector.map_density_k), np.float32)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata))


def load_model(path: str | Path, device: str | None = None, bank: BankConfig | None = None,
               index_factory: IndexFactory | None = None, engine: str | None = None, threads: int | None = None,
               graph_folder: str | Path | None = None) -> Detector:
    """A detector from a model file, its backbone checked against the stored fingerprint.

    Args:
        path: a file written by `save_model`.
        device: where features are computed (default: the device the model was fitted with).
        bank: how to hold the bank this time (storage dtype, search); default settings if None.
        index_factory: builds the bank's index (default: in process; see reb_dist.pipelines.bank).
        engine: what runs the forward pass ("auto", "torch", "onnxruntime"; default: the model's
            setting, "auto" in files saved before engines existed). Any engine scores a model alike.
        threads: CPU threads (default: the model's setting; 0: this process's CPUs).
        graph_folder: where an ONNX engine caches its graph (default: beside the default feature cache).

    Returns:
        The detector, with its bank indexed, its densities preloaded and its calibration restored
        (None for a file saved without one).

    Raises:
        ModelFileError: the file is missing, not a model file, incomplete, has a malformed
            calibration, or its backbone weights differ from the ones found now.
    """
    path = Path(path)
    meta, tensors = read_tensors(path, MODEL_FORMAT, "model file", ("bank", "density", "map_density"))
    try:
        backbone_cfg = BackboneConfig(**json.loads(meta["backbone"]))
        scoring = ScoringConfig(**json.loads(meta["scoring"]))
        image_size = int(meta["image_size"])
        bank_vectors, density = tensors["bank"], tensors["density"]
        if bank_vectors is None or density is None:
            raise KeyError("bank" if bank_vectors is None else "density")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: incomplete or incompatible model file ({exc!r})") from exc
    calibration = _read_calibration(path, meta.get("calibration"))
    check_loaded(path, meta, backbone_cfg, scoring, image_size, tensors)
    for key, value in (("device", device), ("engine", engine), ("threads", threads)):
        if value is not None:  # the loader's to choose: the model's features do not depend on them
            setattr(backbone_cfg, key, value)
    detector = build_detector(backbone_cfg, scoring, image_size, bank, index_factory, graph_folder)
    if detector.backbone.fingerprint != meta.get("backbone_fingerprint"):
        raise ModelFileError(
            f"{path}: was fitted with {backbone_cfg.name} weights of fingerprint "
            f"{meta.get('backbone_fingerprint')} ({meta.get('backbone_weights')}), but the weights "
            f"found now have fingerprint {detector.backbone.fingerprint} ({detector.backbone.weights_source})")
    try:
        detector.set_bank(bank_vectors, density, tensors["map_density"])
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    detector.calibration = calibration
    return detector


def model_metadata(path: str | Path) -> dict[str, str]:
    """A model file's metadata without loading its bank or backbone: "format", "backbone", "scoring",
    "image_size", ... and, in files written with them, "category" and "dataset_root" (older files
    lack them).

    Raises:
        ModelFileError: the file is missing or not a model file.
    """
    meta, _ = read_tensors(Path(path), MODEL_FORMAT, "model file")
    return dict(meta)


# the metadata a model scores by: edited after saving, the model would score otherwise than it was
# fitted to (an image_size changed by hand scored at the wrong size); `settings_sha256` covers them
DIGESTED = ("backbone", "scoring", "image_size", "calibration")  # the fingerprint is checked against the weights


def settings_digest(metadata: dict[str, str]) -> str:
    """The sha256 of a model file's `DIGESTED` metadata entries (hex)."""
    payload = json.dumps({k: metadata.get(k) for k in DIGESTED}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def check_loaded(path: Path, meta: dict[str, str], backbone: BackboneConfig, scoring: ScoringConfig,
                 image_size: int, tensors: dict[str, np.ndarray | None]) -> None:
    """A model file's settings pass the checks settings from a command line pass, its metadata is as
    saved (files written before the digest have none to compare), and its bank and densities are
    finite (densities, mean distances, also >= 0). ModelFileError naming the file otherwise."""
    digest = meta.get("settings_sha256")
    if digest is not None and digest != settings_digest(meta):
        raise ModelFileError(f"{path}: its settings ({', '.join(DIGESTED)}) were changed after it was saved; "
                             "fit the model again with the settings you want")
    cfg = RunConfig(backbone=backbone, scoring=scoring)
    cfg.data.image_size = image_size
    try:
        cfg.validate(f"model file {path}")
    except ConfigError as exc:
        raise ModelFileError(str(exc).removeprefix("model file ")) from exc
    for name in ("bank", "density", "map_density"):
        values = tensors.get(name)
        if values is None:
            continue
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise ModelFileError(f"{path}: its {name} holds {bad} values that are not finite numbers")
        if name != "bank" and (values < 0).any():
            raise ModelFileError(f"{path}: its {name} holds negative values; densities are mean distances (>= 0)")


def _read_calibration(path: Path, text: str | None) -> Calibration | None:
    """The calibration stored in a model file's metadata; None when it has none (older files)."""
    if text is None:
        return None
    try:
        return Calibration.from_dict(json.loads(text))
    except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ModelFileError(f"{path}: malformed calibration in the model file ({exc})") from exc
