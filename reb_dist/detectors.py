"""A `Detector` from the settings object: the one place where settings sections become the core's
plain values (method specs parsed, bank options unpacked), and the sections a model file stores.

It sits just above `reb_dist.config` (and below io/, which loads models through it), so the core
never sees a settings class and the settings never reach into the core's objects.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

from reb_dist.config import BackboneConfig, BankConfig, ScoringConfig
from reb_dist.core.backbones import build_backbone
from reb_dist.core.detector import BankPlan, Detector, DetectorScoring
from reb_dist.core.ldknn import IndexFactory, ScoringMethod, parse_method


def scoring_methods(scoring: ScoringConfig) -> tuple[ScoringMethod, ...]:
    """Every `scoring.methods` spec parsed with scoring.k / alpha / squared; the first with
    `scoring.map_method` as its map when set."""
    s = scoring
    first = parse_method(s.methods[0], s.k, s.alpha, s.squared, s.map_method)
    return (first, *(parse_method(m, s.k, s.alpha, s.squared) for m in s.methods[1:]))


def detector_scoring(scoring: ScoringConfig) -> DetectorScoring:
    """The scoring section as the detector's plain values."""
    return DetectorScoring(scoring_methods(scoring), scoring.k, scoring.squared, scoring.image_score,
                           scoring.sigma, scoring.pixel_metrics)


def bank_plan(bank: BankConfig | None) -> BankPlan:
    """The bank section's coreset, storage, search and recall options (its Ray shard options are the
    placement's, `reb_dist.pipelines.bank`)."""
    bank = bank or BankConfig()
    return BankPlan(**{f.name: getattr(bank, f.name) for f in fields(BankPlan)})


def build_detector(backbone: BackboneConfig, scoring: ScoringConfig, image_size: int = 256,
                   bank: BankConfig | None = None, index_factory: IndexFactory | None = None,
                   graph_folder: str | Path | None = None) -> Detector:
    """A detector with the configured backbone and its weights (ImageNet or a weights file), its
    feature engine and threads; `graph_folder` is where an ONNX engine caches its graph (default:
    beside the default feature cache)."""
    return Detector(build_backbone(backbone.name, backbone.weights), detector_scoring(scoring), image_size,
                    aggregation=backbone.aggregation, layer_dim=backbone.layer_dim, target_dim=backbone.target_dim,
                    device=backbone.device, bank=bank_plan(bank), index_factory=index_factory,
                    settings={"backbone": asdict(backbone), "scoring": asdict(scoring)},
                    engine=backbone.engine, threads=backbone.threads, graph_folder=graph_folder,
                    precision=backbone.precision)


def set_scoring(detector: Detector, scoring: ScoringConfig) -> None:
    """Score a fitted detector with other scoring settings from now on (its bank kept)."""
    detector.scoring = detector_scoring(scoring)
    detector.settings = {**detector.settings, "scoring": asdict(scoring)}


def detector_backbone(detector: Detector) -> BackboneConfig:
    """The backbone section a detector was made with."""
    return BackboneConfig(**detector.settings["backbone"])


def detector_scoring_settings(detector: Detector) -> ScoringConfig:
    """The scoring section a detector was made with."""
    return ScoringConfig(**detector.settings["scoring"])
