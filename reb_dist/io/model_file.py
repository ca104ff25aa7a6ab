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
               category: str | None = None, dataset_root: str | Path | None = None,
               train_images: list[str | Path] | None = None) -> Path:
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
        train_images: the training images' files, in the order the bank was fitted on (default:
            the detector's `train_images`); with the bank's provenance ("bank_source", "feature_grid")
            they let predictions name the training patch nearest to an image's hottest one. Stored
            relative to `dataset_root` where they lie under it.

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
    train_images = train_images if train_images is not None else detector.train_images
    if detector.bank_source is not None and train_images:
        tensors["bank_source"] = detector.bank_source
        metadata["feature_grid"] = json.dumps(list(detector.feature_grid))
        metadata["train_images"] = json.dumps([_relative(p, dataset_root) for p in train_images])
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
    meta, tensors = read_tensors(path, MODEL_FORMAT, "model file", ("bank", "density", "map_density", "bank_source"))
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
    _restore_provenance(path, detector, meta, tensors["bank_source"])
    return detector


def _relative(path: str | Path, root: str | Path | None) -> str:
    """`path` relative to `root` where it lies under it (a model stays valid when the dataset moves)."""
    if root is not None:
        try:
            return str(Path(path).absolute().relative_to(Path(root).absolute()))
        except ValueError:
            pass
    return str(path)


def _restore_provenance(path: Path, detector: Detector, meta: dict[str, str], source: np.ndarray | None) -> None:
    """The bank's provenance and training image files (absolute under the stored dataset root), when
    the file has them; a malformed or inconsistent record is an error naming the file."""
    if source is None:
        return
    try:
        grid = tuple(int(v) for v in json.loads(meta["feature_grid"]))
        names = json.loads(meta["train_images"])
        if len(grid) != 2 or min(grid) < 1 or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"feature_grid {grid}, train_images of type {type(names).__name__}")
        if source.ndim != 1 or len(source) != len(detector.bank) or source.min() < 0 \
                or source.max() >= len(names) * grid[0] * grid[1]:
            raise ValueError(f"bank_source does not index {len(names)} images of {grid[0]}x{grid[1]} patches")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: malformed bank provenance ({exc})") from exc
    detector.bank_source, detector.feature_grid = source.astype(np.int64), grid
    detector.train_images = training_images(meta)


def training_images(meta: dict[str, str]) -> list[str]:
    """The training images a model file records (absolute under its dataset root); [] when it records
    none (files saved before provenance, or fitted from a bank set by hand)."""
    try:
        names = json.loads(meta.get("train_images") or "[]")
    except ValueError:
        return []
    root = meta.get("dataset_root")
    return [n if Path(n).is_absolute() or root is None else str(Path(root) / n) for n in names if isinstance(n, str)]


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
