"""`reb finetune`: DefectMaker fine-tuning per category (the Ray layer's `finetune`), with its MLflow run,
its gallery of what the SSL task trains on, its SSL confusion matrix and, when asked, its learning curve."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from reb_dist.commands.placement import bank_placement
from reb_dist.config import RunConfig
from reb_dist.core.defectmaker import DefectMaker
from reb_dist.distributed.finetune import FinetuneResult, finetune, read_metrics, ssl_class_names
from reb_dist.io.data import read_image
from reb_dist.io.tracking import Tracker
from reb_dist.pipelines.evaluate import load_category
from reb_dist.pipelines.learning_curve import evaluate_checkpoints, write_confusion, write_curve
from reb_dist.reporting.plots import defect_gallery as draw_gallery

log = logging.getLogger(__name__)


def defect_gallery(cfg: RunConfig, category: str, path: Path, n_images: int = 4) -> Path:
    """What the SSL task trains on: every class for a few training images of the category, as a PNG."""
    f = cfg.finetune
    maker = DefectMaker(task=f.task, image_size=cfg.data.image_size, blend_prob=f.blend_prob, saliency=f.saliency)
    train = load_category(cfg.data, category).train
    rows = []
    on_object: dict[int, list[float]] = {}  # class -> shares of defect area on the object (objects only)
    for i in range(min(n_images, len(train))):
        source = read_image(train[(i + 1) % len(train)].image_path)
        samples = maker.sample_all(read_image(train[i].image_path), f.seed + i, source_image=source,
                                   image_path=train[i].image_path)
        rows.append([(maker.classes[s.class_id], s.image, s.mask) for s in samples])
        for s in samples:
            if s.meta.get("on_object") is not None:
                on_object.setdefault(s.class_id, []).append(s.meta["on_object"])
    for c, shares in on_object.items():  # in the column titles
        name, image, mask = rows[0][c]
        rows[0][c] = (f"{name}\n{100 * sum(shares) / len(shares):.0f}% on object", image, mask)
    return draw_gallery(rows, path)


def finetune_categories(cfg: RunConfig, outputs: dict[str, Path]) -> dict[str, FinetuneResult]:
    """`reb finetune`: one MLflow run and one fine-tuned backbone file per category.

    Args:
        cfg: the run's settings.
        outputs: category -> backbone file to write.

    Returns:
        category -> its fine-tuning result.
    """
    tracker = Tracker(cfg.tracking)
    results = {}
    for category, path in outputs.items():
        with tracker.run(cfg, "finetune", run_name=f"finetune-{category}-{cfg.backbone.name}-{cfg.finetune.task}"):
            out = Path(cfg.output_dir) / "finetune" / category
            tracker.log_artifact(defect_gallery(cfg, category, out / "defect_gallery.png"), "plots")
            start = time.perf_counter()
            result = finetune(cfg, category, path, tracker)
            tracker.log_metrics({"wall_seconds": time.perf_counter() - start})
            ssl = read_metrics(result.run_dir)
            title = f"{category}: {cfg.backbone.name} fine-tuned with {cfg.finetune.task}"
            written = write_confusion(ssl, ssl_class_names(cfg), out, f"{title}: SSL confusion")
            if cfg.finetune.evaluate_checkpoints:
                rows = evaluate_checkpoints(cfg, category, result.run_dir, ssl, tracker, bank_placement(cfg))
                written += write_curve(rows, ssl, out, title)
            for path_written in written:
                tracker.log_artifact(path_written, "plots" if path_written.suffix == ".png" else None)
            log.info(f"{category}: {cfg.finetune.steps} steps (resumed from {result.resumed_from_step}) in "
                     f"{time.perf_counter() - start:.0f} s; final {result.final_metrics.get('loss', float('nan')):.3f} "
                     f"loss, {result.final_metrics.get('accuracy', float('nan')):.3f} accuracy; backbone -> {path}")
            log.info(f"use it: reb benchmark --categories {category} --set backbone.finetuned={path}")
        results[category] = result
    return results
