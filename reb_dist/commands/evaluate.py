"""`reb evaluate`: one saved model scored on its category's test set, reported and logged."""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

from reb_dist.commands.placement import bank_placement
from reb_dist.config import RunConfig
from reb_dist.core.ldknn import parse_method
from reb_dist.detectors import detector_backbone, detector_scoring_settings
from reb_dist.errors import ConfigError
from reb_dist.io.feature_cache import graph_folder
from reb_dist.io.model_file import load_model, model_metadata
from reb_dist.io.tracking import Tracker
from reb_dist.pipelines.evaluate import categories_of, evaluate_category
from reb_dist.reporting.results import write_results
from reb_dist.results import CategoryResult

log = logging.getLogger(__name__)
# backbone settings that are the user's to choose at evaluation, not the model's (finetuned: benchmark only)
RUNTIME_BACKBONE_SETTINGS = ("device", "engine", "threads", "finetuned")


def evaluate(cfg: RunConfig, model: str | Path, command_line: str = "") -> CategoryResult:
    """Score one category's test set with a saved model (its first method, or the methods `cfg`
    names when they are not the model's own), report and log it.

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
    placement = bank_placement(cfg)
    detector = load_model(model, cfg.backbone.device, bank=cfg.bank,
                          index_factory=placement(category) if placement else None,
                          engine=cfg.backbone.engine, threads=cfg.backbone.threads,
                          graph_folder=graph_folder(cfg.cache))
    backbone, scoring = detector_backbone(detector), detector_scoring_settings(detector)
    resolved = {"model": str(model), "backbone": asdict(backbone), "scoring": asdict(scoring),
                "image_size": detector.image_size}
    if fitted_on is not None:
        resolved["category"] = fitted_on
    # Say so wherever the user's settings differ from the model's (device, engine and threads are the
    # user's to choose, finetuned is read by benchmark only): a silently replaced --backbone or k misleads.
    def show(value) -> str:
        return f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value)

    differences = [(f"backbone.{k}", v, getattr(backbone, k))
                   for k, v in asdict(cfg.backbone).items() if k not in RUNTIME_BACKBONE_SETTINGS]
    # methods are the user's to choose too: any of them scores from the model's bank (its densities
    # and K are the model's); the same methods as the model's: its default method, as predict scores
    own_methods = cfg.scoring.methods != scoring.methods
    differences += [(f"scoring.{k}", v, getattr(scoring, k)) for k, v in asdict(cfg.scoring).items()
                    if not (own_methods and k == "methods")]
    differences.append(("data.image_size", cfg.data.image_size, detector.image_size))
    for key, yours, models in differences:
        if yours != models:
            log.warning(f"{key}: your settings say {show(yours)}, but {model} was fitted with "
                        f"{show(models)}: the model's value is used")
    tracker = Tracker(cfg.tracking)
    with closing(detector), tracker.run(cfg, "evaluate"):
        tracker.log_params({f"model.{k}": v for k, v in _flat(resolved).items()})
        methods = [detector.default_method]
        if own_methods:
            methods = [parse_method(m, scoring.k, scoring.alpha, scoring.squared) for m in cfg.scoring.methods]
            log.info(f"scoring methods: {', '.join(m.label for m in methods)} (yours; the model was fitted with "
                     f"{', '.join(scoring.methods)}), from the model's bank")
        result = evaluate_category(cfg, category, detector, methods)
        write_results([result], Path(cfg.output_dir) / "evaluate", tracker, command_line, cfg,
                      "evaluate", resolved=resolved)
    return result


def _flat(values: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
