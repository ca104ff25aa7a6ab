"""`reb fit`: a model file per category (bank + densities + settings), each logged as an MLflow model."""

from __future__ import annotations

import json
import logging
from contextlib import closing
from dataclasses import replace
from pathlib import Path

from reb_dist.commands.placement import bank_placement
from reb_dist.config import RunConfig
from reb_dist.core.ldknn import parse_method
from reb_dist.core.thresholds import Calibration
from reb_dist.core.thresholds import calibrate as calibrate_threshold
from reb_dist.errors import ConfigError
from reb_dist.io.model_file import save_model
from reb_dist.io.tracking import Tracker
from reb_dist.io.feature_cache import file_sha256
from reb_dist.pipelines.evaluate import (categories_of, fit_detector, images_category, images_split,
                                        load_category)
from reb_dist.pipelines.validation import ValidationSplit, synthetic_split

log = logging.getLogger(__name__)


def output_files(output: str | None, categories: list[str], default_dir: Path, suffix: str = "") -> dict[str, Path]:
    """One .safetensors file per category: `output` itself for one category, else inside `output`."""
    if output and output.endswith(".safetensors"):
        if len(categories) != 1:
            raise ConfigError(f"--output {output} is one file but there are {len(categories)} categories")
        return {categories[0]: Path(output)}
    folder = Path(output) if output else default_dir
    if folder.exists() and not folder.is_dir():  # checked before any work, not after the bank is built
        raise ConfigError(f"--output {folder}: is a file, not a folder; give a folder, or a .safetensors file "
                          "name for one category")
    return {c: folder / f"{c}{suffix}.safetensors" for c in categories}


def fit(cfg: RunConfig, output: str | None = None, selection: str | Path | None = None,
        calibrate: bool = False, images: list[str | Path] | None = None) -> dict[str, Path]:
    """Fit and save a model (bank + densities + settings) per category.

    Args:
        cfg: the run's settings.
        output: a .safetensors file (one category) or a folder (default <output_dir>/models).
        selection: a `reb tune` selection.json: each category's image (K, alpha), map method and image
            threshold go into its model, and its bank leaves out the training images tune held out
            for validation, so the threshold was taken on this very bank (with the same bank settings).
        calibrate: without a selection, hold out `tune.fraction` (default 0.1) of the training images,
            each giving a normal and a DefectMaker anomaly, build the bank from the rest and take the
            image threshold (`tune.threshold`) and normalisation from their scores.
        images: good images (files, folders) to fit one model from, instead of a dataset's categories:
            no test set is needed; named by data.categories' one name, else the first image's folder.

    Every model is also logged to the fit's MLflow run as a pyfunc MLflow model named after its
    category (reb_dist.io.mlflow_model), and registered under tracking.register_model when set.

    Returns:
        category -> model file written.
    """
    if images and selection:
        raise ConfigError("--images and --selection do not go together: a selection's bank is the dataset's "
                          "training images less those tune held out")
    categories = [images_category(images, cfg.data)] if images else categories_of(cfg.data)
    paths = output_files(output, categories, Path(cfg.output_dir) / "models")
    chosen = read_selection(selection, list(paths)) if selection else {}
    placement = bank_placement(cfg)
    tracker = Tracker(cfg.tracking)
    with tracker.run(cfg, "fit"):
        for category, path in paths.items():
            split = images_split(images, category, cfg.data) if images else load_category(cfg.data, category)
            run_cfg, calibration, validation = cfg, None, None
            if category in chosen:
                run_cfg, calibration, split = apply_selection(cfg, chosen[category], split, selection)
            elif calibrate:
                validation = synthetic_split(split, cfg.tune.fraction or 0.1, cfg.tune.seed, cfg.data.image_size,
                                             cfg.finetune.saliency)
                split = replace(split, train=validation.train)
            with closing(fit_detector(run_cfg, split, placement)) as detector:
                if validation is not None:
                    calibration = synthetic_calibration(detector, validation, cfg)
                detector.calibration = calibration
                root = split.root if images else cfg.data.resolved_root().absolute()
                save_model(detector, path, category=category, dataset_root=root)
                written = file_sha256(path)  # what MLflow logs must be these bytes, whatever replaces the file
            info = {"bank_size": len(detector.bank), "feature_dim": detector.bank.shape[1],
                    **{f"seconds/{k}": v for k, v in detector.timings.seconds.items()},
                    **(calibration.metrics() if calibration is not None else {})}
            tracker.log_result(category, "fit", info)
            log.info(f"{category}: {len(split.train)} images -> bank {detector.bank.shape} "
                     f"(+ densities K={run_cfg.scoring.k}) saved to {path}")
            if calibration is not None:
                log.info(f"{category}: image threshold {calibration.describe()}")
                if calibration.warning():
                    log.warning(f"{category}: {calibration.warning()}")
            model_uri = tracker.log_model(path, category, written)  # a pyfunc MLflow model (+ registry entry)
            if model_uri:
                log.info(f"{category}: MLflow model {model_uri} (mlflow.pyfunc.load_model)")
    return paths


def synthetic_scores(detector, validation: ValidationSplit, batch_size: int):
    """(labels, image scores, source) of a synthetic validation split (held-out normal images and
    DefectMaker anomalies made from them; none of them is in the bank) under the detector's method."""
    import torch

    from reb_dist.io.data import preprocess

    v = validation.validation
    images = torch.stack([preprocess(im, detector.image_size) for im in v.images])
    features = detector.extract(images.split(batch_size), desc="validation")
    method = detector.default_method
    scores = detector.score_features(features, [method])[method].image_scores
    source = f"synthetic validation: {int((v.labels == 0).sum())} normal, {int((v.labels == 1).sum())} anomalous"
    return v.labels, scores, source


def synthetic_calibration(detector, validation: ValidationSplit, cfg: RunConfig) -> Calibration:
    """The image threshold and normalisation of a fitted detector from a synthetic validation split."""
    labels, scores, source = synthetic_scores(detector, validation, cfg.data.batch_size)
    return calibrate_threshold(labels, scores, cfg.tune.threshold, cfg.tune.quantile, source)


def read_selection(path: str | Path, categories: list[str]) -> dict[str, dict]:
    """The per-class choices of a `reb tune` selection.json, for the given categories.

    Raises:
        ConfigError: the file is missing or not a selection, or lacks one of the categories.
    """
    path = Path(path)
    try:
        per_class = json.loads(path.read_text())["per_class"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a `reb tune` selection.json ({exc!r})") from exc
    missing = [c for c in categories if c not in per_class]
    if missing:
        raise ConfigError(f"{path}: has no selection for {missing}; it has {sorted(per_class)}")
    return {c: per_class[c] for c in categories}


def apply_selection(cfg: RunConfig, chosen: dict, split, source: str | Path):
    """(settings, calibration, split) of one category as tune chose them: LDKNN's (K, alpha), the
    map method, the image threshold, and the training images without the ones held out for validation."""
    if parse_method(cfg.scoring.methods[0]).name != "ldknn":
        raise ConfigError(f"{source}: tune chose LDKNN settings, but the first method is {cfg.scoring.methods[0]!r}")
    scoring = replace(cfg.scoring, methods=["ldknn", *cfg.scoring.methods[1:]], k=int(chosen["k"]),
                      alpha=float(chosen["alpha"]), map_method=chosen.get("map_method", ""))
    held_out = set(chosen.get("held_out_train", []))
    split = replace(split, train=[s for s in split.train if str(s.image_path) not in held_out])
    calibration = Calibration.from_dict(chosen["calibration"]) if "calibration" in chosen else None
    return replace(cfg, scoring=scoring), calibration, split
