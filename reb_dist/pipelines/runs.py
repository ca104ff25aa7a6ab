"""What each `reb` command does, callable from Python with the same settings object.

Each function takes the run's `RunConfig` (never edits it), opens the command's MLflow run, does
the work in this process (a sharded bank's actors aside), prints progress lines and the result
table, and writes its files under `cfg.output_dir`. `reb_dist.cli` only parses and calls these.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path

from reb_dist.config import RunConfig
from reb_dist.errors import ConfigError, DatasetError
from reb_dist.io.model_file import load_model, model_metadata, save_model
from reb_dist.io.tracking import Tracker
from reb_dist.pipelines.bank import index_factory, shard_folder
from reb_dist.pipelines.evaluate import (CategoryResult, categories_of, evaluate_category, fit_detector,
                                         load_categories, load_category)
from reb_dist.core.ldknn import parse_method
from reb_dist.core.thresholds import Calibration
from reb_dist.core.thresholds import calibrate as calibrate_threshold
from reb_dist.pipelines.predict import Prediction, find_images, predict
from reb_dist.pipelines.validation import ValidationSplit, synthetic_split
from reb_dist.reporting.results import write_predictions, write_results
from reb_dist.reporting.tables import leader_sentence

log = logging.getLogger(__name__)


def output_files(output: str | None, categories: list[str], default_dir: Path, suffix: str = "") -> dict[str, Path]:
    """One .safetensors file per category: `output` itself for one category, else inside `output`."""
    if output and output.endswith(".safetensors"):
        if len(categories) != 1:
            raise ConfigError(f"--output {output} is one file but there are {len(categories)} categories")
        return {categories[0]: Path(output)}
    folder = Path(output) if output else default_dir
    return {c: folder / f"{c}{suffix}.safetensors" for c in categories}


def fit(cfg: RunConfig, output: str | None = None, selection: str | Path | None = None,
        calibrate: bool = False) -> dict[str, Path]:
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

    Every model is also logged to the fit's MLflow run as a pyfunc MLflow model named after its
    category (reb_dist.io.mlflow_model), and registered under tracking.register_model when set.

    Returns:
        category -> model file written.
    """
    paths = output_files(output, categories_of(cfg.data), Path(cfg.output_dir) / "models")
    chosen = read_selection(selection, list(paths)) if selection else {}
    tracker = Tracker(cfg.tracking)
    with tracker.run(cfg, "fit"):
        for category, path in paths.items():
            split = load_category(cfg.data, category)
            run_cfg, calibration, validation = cfg, None, None
            if category in chosen:
                run_cfg, calibration, split = apply_selection(cfg, chosen[category], split, selection)
            elif calibrate:
                validation = synthetic_split(split, cfg.tune.fraction or 0.1, cfg.tune.seed, cfg.data.image_size,
                                             cfg.finetune.saliency)
                split = replace(split, train=validation.train)
            with closing(fit_detector(run_cfg, split)) as detector:
                if validation is not None:
                    calibration = synthetic_calibration(detector, validation, cfg)
                detector.calibration = calibration
                save_model(detector, path, category=category, dataset_root=cfg.data.resolved_root().absolute())
            info = {"bank_size": len(detector.bank), "feature_dim": detector.bank.shape[1],
                    **{f"seconds/{k}": v for k, v in detector.timings.seconds.items()}}
            tracker.log_result(category, "fit", info)
            log.info(f"{category}: {len(split.train)} images -> bank {detector.bank.shape} "
                     f"(+ densities K={run_cfg.scoring.k}) saved to {path}")
            if calibration is not None:
                log.info(f"{category}: image threshold {calibration.threshold:.6g} ({calibration.method}, "
                         f"{calibration.source})")
            model_uri = tracker.log_model(path, category)  # a pyfunc MLflow model (+ registry entry)
            if model_uri:
                log.info(f"{category}: MLflow model {model_uri} (mlflow.pyfunc.load_model)")
    return paths


def synthetic_calibration(detector, validation: ValidationSplit, cfg: RunConfig) -> Calibration:
    """The image threshold and normalisation of a fitted detector from a synthetic validation split
    (held-out normal images and DefectMaker anomalies made from them; none of them is in the bank)."""
    import torch

    from reb_dist.io.data import preprocess

    v = validation.validation
    images = torch.stack([preprocess(im, detector.image_size) for im in v.images])
    features = detector.extract(images.split(cfg.data.batch_size), desc="validation")
    method = detector.default_method
    scores = detector.score_features(features, [method])[method].image_scores
    source = f"synthetic validation: {int((v.labels == 0).sum())} normal, {int((v.labels == 1).sum())} anomalous"
    return calibrate_threshold(v.labels, scores, cfg.tune.threshold, cfg.tune.quantile, source)


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


def evaluate(cfg: RunConfig, model: str | Path, command_line: str = "") -> CategoryResult:
    """Score one category's test set with a saved model (its first method), report and log it.

    The model's own backbone, scoring and image size are used; where `cfg` asks for other values,
    one warning line per setting on stderr says so. They are returned in the result files and
    MLflow params as `resolved` / `model.*`, and `cfg` is left as given. Features are computed on
    `cfg.backbone.device`. The category is the one the model was fitted on when `cfg` names none
    (models saved before categories were stored: the one category under the root).

    Raises:
        ConfigError: `cfg.data.categories` names another category than the model was fitted on,
            or (for a model without one) not exactly one category.
    """
    fitted_on = model_metadata(model).get("category")  # None in model files older than the field
    asked = cfg.data.categories  # non-empty only when the user chose (--categories / data.categories)
    if fitted_on is not None and asked and asked != [fitted_on]:
        raise ConfigError(f"{model} was fitted on category '{fitted_on}', but the settings ask for "
                          f"'{', '.join(asked)}' (--categories): its scores there would mean nothing")
    if fitted_on is not None and not asked and cfg.data.layout != "folder":
        categories = [fitted_on]
    else:
        categories = categories_of(cfg.data)
    if len(categories) != 1:
        raise ConfigError(f"a model belongs to one category; choose one of {categories} with --categories")
    category = categories[0]
    detector = load_model(model, cfg.backbone.device, bank=cfg.bank,
                          index_factory=index_factory(cfg.bank, shard_folder(cfg.bank, cfg.output_dir, category)))
    resolved = {"model": str(model), "backbone": asdict(detector.backbone_config),
                "scoring": asdict(detector.scoring), "image_size": detector.image_size}
    if fitted_on is not None:
        resolved["category"] = fitted_on
    # Say so wherever the user's settings differ from the model's (device is the user's to choose,
    # finetuned is read by benchmark only): a silently replaced --backbone or k misleads.
    def show(value) -> str:
        return f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value)

    differences = [(f"backbone.{k}", v, getattr(detector.backbone_config, k))
                   for k, v in asdict(cfg.backbone).items() if k not in ("device", "finetuned")]
    differences += [(f"scoring.{k}", v, getattr(detector.scoring, k)) for k, v in asdict(cfg.scoring).items()]
    differences.append(("data.image_size", cfg.data.image_size, detector.image_size))
    for key, yours, models in differences:
        if yours != models:
            log.warning(f"{key}: your settings say {show(yours)}, but {model} was fitted with "
                        f"{show(models)}: the model's value is used")
    tracker = Tracker(cfg.tracking)
    with closing(detector), tracker.run(cfg, "evaluate"):
        tracker.log_params({f"model.{k}": v for k, v in _flat(resolved).items()})
        result = evaluate_category(cfg, category, detector, [detector.default_method])
        write_results([result], Path(cfg.output_dir) / "evaluate", tracker, command_line, cfg,
                      "evaluate", resolved=resolved)
    return result


def benchmark(cfg: RunConfig, command_line: str = "") -> list[CategoryResult]:
    """Every configured method on every category, one bank and one search per category.

    With `backbone.finetuned`, each category is also scored with its fine-tuned weights (the
    "defectmaker" variant: REB = fine-tuned + LDKNN, DefectMaker = fine-tuned + KNN).

    Raises:
        DatasetError, ConfigError: a category's files or its few-shot count cannot be used; every
            category is loaded and checked before the first is computed, so this comes first.
    """
    start = time.perf_counter()
    tracker = Tracker(cfg.tracking)
    log.info(f"# {command_line}")
    # every category's files are read before any features are computed: a bad image in the last
    # category must not throw away the work on the others
    splits = load_categories(cfg.data, categories_of(cfg.data))
    results = []
    with tracker.run(cfg, "benchmark"):
        for category, (split, load_s) in splits.items():
            variants = [("", cfg)]
            if cfg.backbone.finetuned:
                weights = cfg.backbone.finetuned.format(category=category)
                variants.append(("defectmaker", replace(cfg, backbone=replace(cfg.backbone, weights=weights))))
            for variant, run_cfg in variants:
                result = evaluate_category(run_cfg, category, examples=cfg.tracking.heatmap_examples,
                                           split=split, load_s=load_s)
                result.variant = variant
                results.append(result)
                for m in result.methods:
                    tracker.log_result(category, result.label(m.method), m.metrics,
                                       {"k": m.method.k, "alpha": m.method.alpha,
                                        "weights": run_cfg.backbone.weights or "imagenet"})
                log.info(f"{category}{' ' + variant if variant else ''}: bank {result.bank_size} x "
                         f"{result.feature_dim}, {len(result.labels)} test images, {result.timings['total']:.0f} s "
                         f"({', '.join(f'{k} {v:.1f}' for k, v in result.timings.items() if k != 'total')})")
        rows = write_results(results, Path(cfg.output_dir) / "benchmark", tracker, command_line, cfg,
                             "benchmark", wall=time.perf_counter() - start)
    print(f"\n{leader_sentence(rows)}")  # what the table shows, in one sentence: the run's last line
    return results


def predict_images(model: str | Path, images: list[str | Path], output: str | Path = "predictions",
                   threshold: float | None = None, device: str | None = None,
                   batch_size: int = 16) -> list[Prediction]:
    """Score image files (and folders of them) with a saved model; overlays and scores.csv in `output`.

    Args:
        model: a model file from `fit`.
        images: image files or folders.
        output: the folder for `<stem>_heatmap.png` overlays (made unique where stems repeat, see
            `write_predictions`) and scores.csv.
        threshold: flag images whose score is at least this (an `anomalous` column); None: the
            model's saved (calibrated) threshold, if it has one, else no flags.
        device: where features are computed (default: the model's).
        batch_size: images per feature batch.

    Raises:
        DatasetError: some images could not be scored (unreadable, too small, ...): raised after the
            others' overlays and scores.csv (with an error column) are written, naming each bad image
            with its problem.
    """
    with closing(load_model(model, device)) as detector:
        calibration = detector.calibration
        if threshold is not None:
            log.info(f"threshold {threshold:.6g}: given")
        elif calibration is not None:
            quantile = f" {calibration.quantile:g}" if calibration.quantile is not None else ""
            source = f" on {calibration.source}" if calibration.source else ""
            log.info(f"threshold {calibration.threshold:.6g}: the model's calibration "
                     f"({calibration.method}{quantile}{source})")
        else:
            log.info("no threshold: none given and the model has no calibration, so images are not flagged")
        predictions = predict(detector, find_images(images), batch_size, threshold)
    write_predictions(predictions, Path(output), threshold, calibration)
    failed = [p for p in predictions if p.error is not None]
    if failed:  # a non-zero exit, though the good images' results are written
        others = "".join(f"\n{p.path}: {p.error}" for p in failed[1:])
        raise DatasetError(failed[0].path, f"{failed[0].error}{others}\n{len(predictions) - len(failed)} of "
                                           f"{len(predictions)} images scored; overlays and scores.csv "
                                           f"(with an error column) in {output}")
    return predictions


def _flat(values: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
