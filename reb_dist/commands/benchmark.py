"""`reb benchmark`: every configured method on every category, one table."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from reb_dist.commands.placement import bank_placement
from reb_dist.config import RunConfig
from reb_dist.io.tracking import Tracker
from reb_dist.pipelines.evaluate import categories_of, evaluate_category, load_categories
from reb_dist.reporting.results import write_results
from reb_dist.reporting.tables import leader_sentence
from reb_dist.results import CategoryResult

log = logging.getLogger(__name__)


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
    placement = bank_placement(cfg)
    with tracker.run(cfg, "benchmark"):
        for category, (split, load_s) in splits.items():
            variants = [("", cfg)]
            if cfg.backbone.finetuned:
                weights = cfg.backbone.finetuned.format(category=category)
                variants.append(("defectmaker", replace(cfg, backbone=replace(cfg.backbone, weights=weights))))
            for variant, run_cfg in variants:
                result = evaluate_category(run_cfg, category, examples=cfg.tracking.heatmap_examples,
                                           split=split, load_s=load_s, placement=placement)
                result.variant = variant
                results.append(result)
                for m in result.methods:
                    tracker.log_result(category, result.label(m.method), m.metrics,
                                       {"k": m.method.k, "alpha": m.method.alpha,
                                        "weights": run_cfg.backbone.weights or "imagenet"}, mode=result.search_mode)
                log.info(f"{category}{' ' + variant if variant else ''}: bank {result.bank_size} x "
                         f"{result.feature_dim} ({result.search_mode}), {len(result.labels)} test images, "
                         f"{result.timings['total']:.0f} s "
                         f"({', '.join(f'{k} {v:.1f}' for k, v in result.timings.items() if k != 'total')})")
        rows = write_results(results, Path(cfg.output_dir) / "benchmark", tracker, command_line, cfg,
                             "benchmark", wall=time.perf_counter() - start)
    print(f"\n{leader_sentence(rows)}")  # what the table shows, in one sentence: the run's last line
    return results
