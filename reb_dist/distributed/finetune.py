"""Driver of a fine-tuning run: DefectMaker stream (Ray Data) -> TorchTrainer (Ray Train) -> backbone file.

A run is named; its checkpoints live under `finetune.storage_path/<name>`. Running the same command
again after an interruption resumes from the newest checkpoint there. The result is a backbone
weights file (safetensors, the backbone's own key names) that `backbone.weights=` loads.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reb_dist.config import RunConfig
from reb_dist.errors import RebError
from reb_dist.distributed.train_loop import BACKBONE_FILE, STATE_FILE, micro_batches_per_step, train_loop_per_worker

METRICS_FILE = "metrics.jsonl"
SETTINGS_FILE = "reb_settings.json"
# settings that decide where and how fast a run trains, not what it learns: free to change on resume
RESOURCE_SETTINGS = {"checkpoint_every", "num_workers", "use_gpu", "cpus_per_worker", "data_workers", "data_cpus",
                     "torch_threads", "storage_path", "run_name", "fail_at_step"}


@dataclass
class FinetuneResult:
    backbone_path: Path
    run_dir: Path
    resumed_from_step: int
    final_metrics: dict


def run_name(cfg: RunConfig, category: str) -> str:
    return cfg.finetune.run_name or f"finetune-{category}-{cfg.backbone.name}-{cfg.finetune.task}"


def run_settings(cfg: RunConfig, category: str) -> dict:
    """What a run learns from: resuming with any of these changed would mix two experiments."""
    learned = {k: v for k, v in vars(cfg.finetune).items() if k not in RESOURCE_SETTINGS}
    return {"category": category, "image_size": cfg.data.image_size, "backbone": cfg.backbone.name,
            "weights": cfg.backbone.weights, **{f"finetune.{k}": v for k, v in learned.items()}}


def check_run_settings(run_dir: Path, settings: dict) -> None:
    """Record a new run's settings; refuse to resume (or reuse) a run trained with other ones."""
    from reb_dist.reporting.plots import write_text_atomic

    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(settings, indent=1, default=str))
        return
    saved = json.loads(path.read_text())
    changed = {k: (saved.get(k), v) for k, v in json.loads(json.dumps(settings, default=str)).items()
               if saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise RebError(f"{run_dir}: this run was trained with other settings ({listed}); resuming would mix "
                       f"two experiments. Name a new run (--set finetune.run_name=...) or remove that folder.")


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, int]:
    """The newest complete checkpoint of a run folder (highest step) and its step; (None, 0) if none."""
    best, best_step = None, 0
    if not run_dir.is_dir():
        return None, 0
    from safetensors import safe_open

    for state in run_dir.rglob(BACKBONE_FILE):
        if not (state.parent / STATE_FILE).is_file():
            continue  # a checkpoint copy that did not finish
        try:
            with safe_open(str(state), framework="numpy") as f:
                step = int((f.metadata() or {}).get("step", 0))
        except Exception:
            continue
        if step > best_step:
            best, best_step = state.parent, step
    return best, best_step


def base_images_per_step(cfg: RunConfig, num_classes: int, workers: int) -> float:
    """Base images (each giving one sample per class) all workers consume in one step."""
    f = cfg.finetune
    micro_per_step = micro_batches_per_step(f.images_per_step, f.micro_batch, workers)
    return micro_per_step * f.micro_batch * workers / num_classes


def finetune(cfg: RunConfig, category: str, output: str | Path, tracker=None) -> FinetuneResult:
    from reb_dist.core.defectmaker import DefectMaker
    from reb_dist.pipelines.evaluate import load_category

    f = cfg.finetune
    split = load_category(cfg.data, category)
    paths = [str(s.image_path) for s in split.train]
    class_names = list(DefectMaker(task=f.task, image_size=cfg.data.image_size).classes)
    storage = Path(f.storage_path).absolute()
    name = run_name(cfg, category)
    run_dir = storage / name
    check_run_settings(run_dir, run_settings(cfg, category))
    checkpoint_dir, start_step = latest_checkpoint(run_dir)
    train_metrics = {}
    if start_step < f.steps:
        train_metrics = _train(cfg, name, storage, run_dir, checkpoint_dir, start_step, paths, class_names)
    else:  # a finished run only has its backbone copied out: no Ray, no trainer
        print(f"{name}: already trained {start_step} steps")
    final_dir, final_step = latest_checkpoint(run_dir)
    if final_dir is None or final_step < f.steps:
        raise RebError(f"{run_dir}: training stopped at step {final_step} of {f.steps}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output.parent, suffix=".tmp", delete=False) as tmp:
        shutil.copyfile(final_dir / BACKBONE_FILE, tmp.name)
    Path(tmp.name).replace(output)
    metrics = read_metrics(run_dir)
    if tracker is not None:
        for row in metrics:
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
    return FinetuneResult(output, run_dir, start_step, train_metrics or (metrics[-1] if metrics else {}))


def _train(cfg: RunConfig, name: str, storage: Path, run_dir: Path, checkpoint_dir: Path | None,
           start_step: int, paths: list[str], class_names: list[str]) -> dict:
    """Run (or resume) the TorchTrainer fed by the DefectMaker stream; the last reported metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from reb_dist.distributed.runtime import ensure_ray
    from reb_dist.distributed.defect_stream import defect_dataset

    f = cfg.finetune
    started_ray = ensure_ray()
    try:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 if f.use_gpu == "auto" else f.use_gpu.lower() == "true"
        workers = min(f.num_workers, int(gpus)) if use_gpu else f.num_workers
        remaining = max(0, f.steps - start_step)
        per_step = base_images_per_step(cfg, len(class_names), workers)
        # A resumed run skips exactly the base images the earlier steps consumed; a small margin
        # covers micro-batches that straddle the end of the stream.
        dataset = defect_dataset(
            paths, math.ceil(start_step * per_step), math.ceil(max(remaining, 1) * per_step) + 2 * workers * 8,
            task=f.task, image_size=cfg.data.image_size, blend_prob=f.blend_prob, saliency=f.saliency,
            run_seed=f.seed, data_workers=f.data_workers, data_cpus=f.data_cpus)
        loop_config = {
            "backbone": cfg.backbone.name, "weights": cfg.backbone.weights, "class_names": class_names,
            "steps": f.steps, "images_per_step": f.images_per_step, "micro_batch": f.micro_batch,
            "freeze_steps": f.freeze_steps, "bn_stats": f.bn_stats, "lr": f.lr, "momentum": f.momentum,
            "weight_decay": f.weight_decay, "loss": f.loss, "checkpoint_every": f.checkpoint_every,
            "seed": f.seed, "torch_threads": f.torch_threads, "fail_at_step": f.fail_at_step,
            "metrics_file": str(run_dir / METRICS_FILE),
            # Ray Train V2 restores a run of the same name by itself; this covers a run folder that
            # was copied or whose Ray snapshot is gone.
            "resume_from": str(checkpoint_dir) if checkpoint_dir else None,
        }
        resources = {"CPU": f.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(storage),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=0)),
            datasets={"train": dataset})
        return trainer.fit().metrics or {}
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-step metrics rank 0 appended; after a resume the last record of a step wins."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]
