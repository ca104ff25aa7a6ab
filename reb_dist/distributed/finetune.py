"""Driver of a fine-tuning run: DefectMaker stream (Ray Data) -> TorchTrainer (Ray Train) -> backbone file.

A run is named; its checkpoints live under `finetune.storage_path/<name>`. Running the same command
again after an interruption resumes from the newest checkpoint there; within one command, a worker
that dies (an OOM kill, a lost node) is restarted by Ray Train from that checkpoint too, up to
`finetune.max_failures` times (default 2). The result is a backbone weights file (safetensors, the backbone's own key
names) that `backbone.weights=` loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from reb_dist.config import RunConfig
from reb_dist.pipelines.ssl_training import (BACKBONE_FILE, TrainLoopSettings, latest_checkpoint, stream_window,
                                             train_in_process)
from reb_dist.errors import RebError
from reb_dist.io.atomic import copy_atomic, run_alone, write_text_atomic

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
SETTINGS_FILE = "reb_settings.json"
# settings that decide where and how fast a run trains, not what it learns: free to change on resume
RESOURCE_SETTINGS = {"engine", "evaluate_checkpoints", "checkpoint_every", "max_failures", "num_workers", "use_gpu", "cpus_per_worker", "data_workers",
                     "data_cpus", "torch_threads", "storage_path", "run_name", "fail_at_step"}
# testing: rank 0 SIGKILLs itself after this step, on the first attempt only (a real worker death)
KILL_WORKER_ENV = "REB_TEST_KILL_WORKER_AT_STEP"


RAY_RESOURCE_STEP = 1e-4  # Ray's granularity of fractional resources


def fit_cpus(cluster_cpus: float, workers: int, cpus_per_worker: float, data_workers: int,
             data_cpus: float) -> tuple[float, float]:
    """CPUs per training worker and per DefectMaker actor such that all of them fit on the cluster at once.

    The training workers and the data pipeline's actors run together: if the workers take every CPU
    (two workers of one CPU on a 2-CPU cluster), the actors wait for a CPU for ever and so does
    training. Both are scaled down by one factor when the plan asks more CPUs than the cluster has;
    CPUs are only Ray's scheduling units here, so the run computes the same thing, only sharing cores.

    Raises:
        RebError: the cluster has no CPUs at all.
    """
    if cluster_cpus <= 0:
        raise RebError("the Ray cluster has no CPUs: fine-tuning needs at least one for its workers and "
                       "DefectMaker actors")
    asked = workers * cpus_per_worker + data_workers * data_cpus
    if asked <= cluster_cpus:
        return cpus_per_worker, data_cpus
    scale = cluster_cpus / asked

    def down(cpus: float) -> float:
        return max(RAY_RESOURCE_STEP, math.floor(cpus * scale / RAY_RESOURCE_STEP) * RAY_RESOURCE_STEP)

    per_worker, per_actor = down(cpus_per_worker), down(data_cpus)
    log.warning("the Ray cluster has %g CPUs, the fine-tuning plan asks %g (%d workers x %g + %d DefectMaker "
                "actors x %g): giving each worker %.4g and each actor %.4g CPUs so that all of them start "
                "(finetune.num_workers, finetune.cpus_per_worker, finetune.data_workers, finetune.data_cpus "
                "set the plan)", cluster_cpus, asked, workers, cpus_per_worker, data_workers, data_cpus,
                per_worker, per_actor)
    return per_worker, per_actor


@dataclass
class FinetuneResult:
    """Where the fine-tuned backbone went, the run's folder, the step it resumed from, its last metrics."""

    backbone_path: Path
    run_dir: Path
    resumed_from_step: int
    final_metrics: dict


def run_name(cfg: RunConfig, category: str) -> str:
    """finetune.run_name, else finetune-<category>-<backbone>-<task>."""
    return cfg.finetune.run_name or f"finetune-{category}-{cfg.backbone.name}-{cfg.finetune.task}"


def run_settings(cfg: RunConfig, category: str) -> dict:
    """What a run learns from: resuming with any of these changed would mix two experiments."""
    learned = {k: v for k, v in vars(cfg.finetune).items() if k not in RESOURCE_SETTINGS}
    return {"category": category, "image_size": cfg.data.image_size, "backbone": cfg.backbone.name,
            "weights": cfg.backbone.weights, **{f"finetune.{k}": v for k, v in learned.items()}}


def check_run_settings(run_dir: Path, settings: dict) -> None:
    """Record a new run's settings; refuse to resume (or reuse) a run trained with other ones."""
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


def finetune(cfg: RunConfig, category: str, output: str | Path, tracker=None) -> FinetuneResult:
    """Fine-tune (or resume, or reuse a finished run) and write the backbone to `output`.

    Args:
        cfg: the run's settings (data, backbone, finetune).
        category: the class whose training images DefectMaker turns into the SSL task.
        output: the backbone .safetensors file to write (atomically).
        tracker: per-step metrics go to this run's MLflow tracker, if given.

    Returns:
        What was written and how the run went.

    Raises:
        RebError: the named run was trained with other settings, stopped before its last step, or
            is being trained by another process.
    """
    f = cfg.finetune
    storage = Path(f.storage_path).absolute()
    name = run_name(cfg, category)
    # two trainings of one run wrote one folder's checkpoints and metrics in turn (each step logged twice)
    with run_alone(storage / f"{name}.lock", f"{storage / name}: another process is training this run now; wait "
                   f"for it (this command then reuses what it trained), or give this one another finetune.run_name"):
        return _finetune(cfg, category, output, tracker, storage, name)


def _finetune(cfg: RunConfig, category: str, output: str | Path, tracker, storage: Path, name: str) -> FinetuneResult:
    """`finetune`'s work, with the run's lock held."""
    from reb_dist.pipelines.evaluate import load_category

    f = cfg.finetune
    split = load_category(cfg.data, category)
    paths = [str(s.image_path) for s in split.train]
    class_names = ssl_class_names(cfg)
    run_dir = storage / name
    check_run_settings(run_dir, run_settings(cfg, category))
    start_step = latest_checkpoint(run_dir)[1]
    train_metrics = {}
    if start_step < f.steps and f.engine == "local":
        train_metrics = _train_local(cfg, run_dir, paths, class_names)
    elif start_step < f.steps:
        train_metrics = _train(cfg, name, storage, run_dir, paths, class_names)
    else:  # a finished run only has its backbone copied out: no Ray, no trainer
        log.info(f"{name}: already trained {start_step} steps")
    final_dir, final_step = latest_checkpoint(run_dir)
    if final_dir is None or final_step < f.steps:
        raise RebError(f"{run_dir}: training stopped at step {final_step} of {f.steps}")
    output = copy_atomic(final_dir / BACKBONE_FILE, output)
    metrics = read_metrics(run_dir)
    if tracker is not None:
        for row in metrics:
            tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "confusion")},
                                step=int(row["step"]))
    return FinetuneResult(output, run_dir, start_step, train_metrics or (metrics[-1] if metrics else {}))


def ssl_class_names(cfg: RunConfig) -> list[str]:
    """The SSL task's classes, in label order."""
    from reb_dist.core.defectmaker import DefectMaker

    return list(DefectMaker(task=cfg.finetune.task, image_size=cfg.data.image_size).classes)


def _resumed_stream(cfg: RunConfig, run_dir: Path, paths: list[str], num_classes: int, workers: int,
                    data_cpus: float):
    """The DefectMaker stream from the newest checkpoint of `run_dir` on.

    Ray Train calls this each time it starts the worker group, first and after a worker died, so a
    retry reads on from its checkpoint instead of from the start of the stream; the train loop
    resumes from the same scan of `run_dir`, so model and data agree.
    """
    from reb_dist.distributed.defect_stream import defect_dataset

    f = cfg.finetune
    first, count = stream_window(f, latest_checkpoint(run_dir)[1], num_classes, workers)
    return defect_dataset(
        paths, first, count, task=f.task, image_size=cfg.data.image_size, blend_prob=f.blend_prob,
        saliency=f.saliency, run_seed=f.seed, data_workers=f.data_workers, data_cpus=data_cpus)


def _loop_settings(cfg: RunConfig, run_dir: Path, class_names: list[str]) -> TrainLoopSettings:
    kill_at = os.environ.get(KILL_WORKER_ENV)
    return TrainLoopSettings(cfg.finetune, cfg.backbone.name, cfg.backbone.weights, tuple(class_names),
                             str(run_dir / METRICS_FILE), str(run_dir), int(kill_at) if kill_at else None)


def _train_local(cfg: RunConfig, run_dir: Path, paths: list[str], class_names: list[str]) -> dict:
    """finetune.engine=local: the same loop and rows as one Ray Train worker, in this process (no Ray)."""
    import torch

    device = "cuda" if cfg.finetune.use_gpu != "false" and torch.cuda.is_available() else "cpu"
    if cfg.finetune.use_gpu == "true" and device == "cpu":
        raise RebError("finetune.use_gpu=true but torch sees no CUDA device")
    return train_in_process(_loop_settings(cfg, run_dir, class_names), paths, cfg.data.image_size, device)


def _train(cfg: RunConfig, name: str, storage: Path, run_dir: Path, paths: list[str],
           class_names: list[str]) -> dict:
    """Run (or resume) the TorchTrainer fed by the DefectMaker stream; the last reported metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from reb_dist.distributed.runtime import ensure_ray
    from reb_dist.distributed.train_loop import train_loop_per_worker

    f = cfg.finetune
    started_ray = ensure_ray()
    try:
        import ray.data

        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 if f.use_gpu == "auto" else f.use_gpu.lower() == "true"
        workers = min(f.num_workers, int(gpus)) if use_gpu else f.num_workers
        worker_cpus, data_cpus = fit_cpus(ray.cluster_resources().get("CPU", 0), workers, f.cpus_per_worker,
                                          f.data_workers, f.data_cpus)
        stream = partial(_resumed_stream, cfg, run_dir, paths, len(class_names), workers, data_cpus)
        # Ray Train builds the stream in its controller (where defect_dataset's own setting is lost) but
        # ingests it with the driver's DataContext options: keep the row order a resumed stream needs.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        settings = _loop_settings(cfg, run_dir, class_names)
        resources = {"CPU": worker_cpus} | ({"GPU": 1} if use_gpu else {})
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"settings": settings},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(storage),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None if f.evaluate_checkpoints else 2),
                # fail_at_step stands for the whole run being stopped, not a worker dying: no retry
                failure_config=ray.train.FailureConfig(
                    max_failures=0 if f.fail_at_step is not None else f.max_failures)),
            datasets={"train": stream})
        return fit_trainer(trainer).metrics or {}
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def fit_trainer(trainer):
    """`trainer.fit()`, where Ctrl-C is what it is everywhere in reb: a KeyboardInterrupt, here once Ray
    Train has aborted the run (its checkpoints are kept: the same command resumes it).

    Ray Train v2 sets its own SIGINT handler for a fit and leaves it set: it aborts the run, then calls
    sys.exit(0), which came out of `ray.get` as SystemExit(1). So a Ctrl-C'd `reb finetune` exited
    with status 1 and not a word, and a Ctrl-C after the fit went to the handler of an ended run.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    aborted = []
    if hasattr(trainer, "_register_sigint_handler"):  # Ray Train v2 calls it, in the main thread only
        trainer._register_sigint_handler = partial(_abort_on_ctrl_c, aborted=aborted)
    try:
        return trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        if not aborted:
            raise
        raise KeyboardInterrupt("Ray Train aborted the run; the same command resumes it from its newest "
                                "checkpoint") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _abort_on_ctrl_c(controller, aborted: list) -> None:
    """Set a SIGINT handler that aborts the Ray Train run of `controller` (its TrainController actor),
    appends to `aborted`, then interrupts; a second Ctrl-C interrupts at once."""
    import ray

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("Ctrl-C: aborting the Ray Train run (a second Ctrl-C stops without waiting)")
        try:
            ray.get(controller.abort.remote(), timeout=120)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # abort ends the controller's process, so its call never returns
        aborted.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


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
