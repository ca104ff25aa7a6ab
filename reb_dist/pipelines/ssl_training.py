"""REB's self-supervised fine-tuning loop, without Ray: what one worker does, and a one-process run.

One step = one optimiser update over `images_per_step` images (all workers together), accumulated
over micro-batches; SGD with momentum, cosine decay, backbone frozen for the first `freeze_steps`.
Rank 0 writes a checkpoint every `checkpoint_every` steps; a restarted run continues from the newest
one with the same data order, because every sample's seed depends only on its global index.

`train_steps` is the loop itself. Ray Train runs it on every worker (reb_dist.distributed.train_loop,
with DDP and the Ray Data stream); `train_in_process` runs it in this process on the same
DefectMaker rows, in the same order, so a machine with only torch (a lone GPU box, a laptop) trains
exactly what one Ray worker would: the same seed gives the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reb_dist.config import FinetuneConfig
from reb_dist.core.backbones import build_backbone
from reb_dist.core.ssl_model import SSLClassifier
from reb_dist.io.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from reb_dist.pipelines.defect_batches import DefectBatchMaker, defect_items

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
BACKBONE_FILE = "backbone.safetensors"
KILLED_MARKER = "killed_worker_at_step"  # testing: kill_worker_at_step already fired in this run folder
ROWS_PER_MAKER_CALL = 4  # base images per DefectMaker call, as the Ray Data stream batches them


@dataclass(frozen=True)
class TrainLoopSettings:
    """What every worker needs: the typed fine-tuning settings and the run's facts."""

    finetune: FinetuneConfig
    backbone: str  # registry name
    weights: str | None  # start weights (None: ImageNet)
    class_names: tuple[str, ...]
    metrics_file: str | None = None  # rank 0 appends one JSON line per step (with its batches' SSL confusion matrix)
    # The run folder: every start of the loop (a new command or a retry) resumes from its newest
    # complete checkpoint, the same scan that places the start of the data stream, so the model and the
    # stream cannot disagree (Ray's own latest checkpoint can lag: a worker killed right after
    # reporting takes the report with it, while the checkpoint is already on disk).
    run_dir: str | None = None
    kill_worker_at_step: int | None = None  # testing: rank 0 SIGKILLs itself after this step, once per run_dir


def complete_checkpoints(run_dir: Path) -> dict[int, Path]:
    """step -> folder of every complete checkpoint under a run folder (Ray's or the one-process run's).

    A checkpoint whose copy was cut short is passed over: Ray copies checkpoint folders file by file,
    and a run stopped while rank 0 was uploading (another rank failing first tears the group down)
    leaves a truncated train_state.pt behind, which would fail every resume.
    """
    found: dict[int, Path] = {}
    if not run_dir.is_dir():
        return found
    import zipfile

    from safetensors import safe_open

    for state in run_dir.rglob(BACKBONE_FILE):
        if not zipfile.is_zipfile(state.parent / STATE_FILE):  # torch.save writes a zip; its directory comes last
            continue  # missing, or a copy that did not finish
        try:
            with safe_open(str(state), framework="numpy") as f:
                step = int((f.metadata() or {}).get("step", 0))
        except Exception:
            continue
        if step > 0:
            found[step] = state.parent
    return found


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, int]:
    """The newest complete checkpoint of a run folder (highest step) and its step; (None, 0) if none."""
    found = complete_checkpoints(run_dir)
    if not found:
        return None, 0
    step = max(found)
    return found[step], step


def kill_once(marker: Path) -> None:
    """Testing: die as an OOM kill or a lost node would (SIGKILL, no Python cleanup), unless `marker`
    shows an earlier attempt of this run already did, so that the retry can finish."""
    try:
        marker.open("x").close()
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float, ImageNet-normalised."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def micro_batches_per_step(images_per_step: int, micro_batch: int, workers: int) -> int:
    """Micro-batches each worker accumulates per step (whole micro-batches, at least one)."""
    return max(1, images_per_step // (micro_batch * workers))


def base_images_per_step(f: FinetuneConfig, num_classes: int, workers: int) -> float:
    """Base images (each giving one sample per class) all workers consume in one step."""
    return micro_batches_per_step(f.images_per_step, f.micro_batch, workers) * f.micro_batch * workers / num_classes


def stream_window(f: FinetuneConfig, start_step: int, num_classes: int, workers: int) -> tuple[int, int]:
    """(first row, rows) of the DefectMaker stream a run resumed at `start_step` reads.

    A resumed run skips exactly the base images the earlier steps consumed; a small margin covers
    micro-batches that straddle the end of the stream.
    """
    per_step = base_images_per_step(f, num_classes, workers)
    remaining = max(0, f.steps - start_step)
    return math.ceil(start_step * per_step), math.ceil(max(remaining, 1) * per_step) + 2 * workers * 8


def cosine_lr(step: int, total: int, base: float) -> float:
    """The cosine-decayed learning rate at `step` of `total` from `base`."""
    return 0.5 * base * (1 + math.cos(math.pi * min(step, total) / total))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """"ce" as the paper writes; "bce" (sigmoid per class on one-hot targets) as the authors' code."""
    if kind == "ce":
        return F.cross_entropy(logits, labels)
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[1]).float())


def build_model(settings: TrainLoopSettings, device: torch.device,
                rank: int = 0) -> tuple[SSLClassifier, torch.optim.Optimizer, int]:
    """The SSL classifier and its optimiser, seeded per rank, resumed from the run folder's newest
    checkpoint if there is one; also returns the step it resumes at (0 for a new run)."""
    f = settings.finetune
    torch.manual_seed(f.seed + rank)
    torch.set_num_threads(max(1, f.torch_threads))
    model = SSLClassifier(build_backbone(settings.backbone, settings.weights), len(settings.class_names),
                          bn_stats=f.bn_stats).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(
        [{"params": list(model.net.parameters()), "name": "backbone"},
         {"params": list(model.head.parameters()), "name": "head"}],
        lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    start_step = 0
    checkpoint_dir = latest_checkpoint(Path(settings.run_dir))[0] if settings.run_dir else None
    if checkpoint_dir is not None:
        state = torch.load(checkpoint_dir / STATE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        if rank == 0:
            log.info("resuming from step %d: %s", start_step, checkpoint_dir)
    return model, optimizer, start_step


# report(metrics, checkpoint folder or None): Ray Train's report, or the one-process run's writer. The
# folder is temporary: the callback must copy what it keeps before returning.
Report = Callable[[dict, "Path | None"], None]


def train_steps(settings: TrainLoopSettings, model: SSLClassifier, optimizer: torch.optim.Optimizer,
                batches: Iterator[dict], start_step: int, *, report: Report, device: torch.device,
                rank: int = 0, workers: int = 1, forward: torch.nn.Module | None = None) -> None:
    """Train from `start_step` to `finetune.steps` on `batches` ("image" uint8 (B, S, S, 3), "label").

    Args:
        settings: the run's settings.
        model: the SSL classifier (its state is what checkpoints save).
        optimizer: `build_model`'s optimiser over `model`.
        batches: micro-batches of `finetune.micro_batch` samples, in stream order.
        start_step: the step to start at (a resumed run's checkpoint step).
        report: called after every step with its metrics, and on checkpoint steps with a folder
            holding rank 0's checkpoint (other ranks get None).
        device: where the model is.
        rank: this worker's rank; workers: how many train together.
        forward: the module to call (DDP's wrapper on a cluster); default `model`.
    """
    f = settings.finetune
    forward = forward if forward is not None else model
    backbone_params = optimizer.param_groups[0]["params"]
    steps, freeze = f.steps, f.freeze_steps
    micro_per_step = micro_batches_per_step(f.images_per_step, f.micro_batch, workers)
    n_classes = len(settings.class_names)
    forward.train()
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        frozen = step < freeze
        for group in optimizer.param_groups:
            lr = cosine_lr(step, steps, f.lr)
            group["lr"] = 0.0 if (frozen and group["name"] == "backbone") else lr
        optimizer.zero_grad(set_to_none=True)
        confusion = np.zeros((n_classes, n_classes), dtype=np.int64)  # [true class, predicted class]
        loss_sum, n_images = 0.0, 0
        for _ in range(micro_per_step):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the DefectMaker stream ran out at step {step}: it must hold "
                                   f"steps x images_per_step rows") from None
            images = normalise(batch["image"].to(device))
            labels = batch["label"].to(device)
            logits = forward(images)
            loss = loss_fn(logits, labels, f.loss)
            (loss / micro_per_step).backward()
            loss_sum += float(loss.detach()) * len(labels)
            n_images += len(labels)
            np.add.at(confusion, (labels.cpu().numpy(), logits.argmax(1).cpu().numpy()), 1)
        if frozen:  # weight decay and momentum must not move a frozen backbone either
            for p in backbone_params:
                p.grad = None
        optimizer.step()

        done = step + 1
        seen, correct = confusion.sum(1), np.diag(confusion)
        metrics = {"step": done, "images_seen": done * n_images * workers, "loss": loss_sum / max(n_images, 1),
                   "accuracy": float(correct.sum() / max(seen.sum(), 1)),
                   "lr": cosine_lr(step, steps, f.lr), "backbone_frozen": float(frozen),
                   "images_per_second_worker": n_images / (time.perf_counter() - t0)}
        metrics.update({f"accuracy/{name}": float(correct[i] / seen[i])
                        for i, name in enumerate(settings.class_names) if seen[i]})
        if rank == 0 and settings.metrics_file:  # the full history, for MLflow and plots
            Path(settings.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            with open(settings.metrics_file, "a") as fh:
                fh.write(json.dumps(metrics | {"confusion": confusion.tolist()}) + "\n")
        if done % f.checkpoint_every == 0 or done == steps:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_checkpoint(Path(tmp), model, optimizer, done, settings.backbone)
                report(metrics, Path(tmp) if rank == 0 else None)
        else:
            report(metrics, None)
        if settings.kill_worker_at_step == done and rank == 0 and settings.run_dir:
            kill_once(Path(settings.run_dir) / f"{KILLED_MARKER}_{done}")
        if f.fail_at_step == done:
            raise RuntimeError(f"interrupted on purpose after step {done} (fail_at_step)")


def save_checkpoint(folder: Path, model: SSLClassifier, optimizer: torch.optim.Optimizer, step: int,
                    backbone: str) -> None:
    """The resumable state (model + optimiser) and the backbone file `backbone.weights=` loads."""
    from safetensors.torch import save_file

    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
               folder / STATE_FILE)
    save_file(model.backbone_state_dict(), str(folder / BACKBONE_FILE), {"backbone": backbone, "step": str(step)})


_worker_maker = None  # a process pool worker's DefectBatchMaker


def _init_worker(task: str, image_size: int, blend_prob: float, saliency: str) -> None:
    global _worker_maker
    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    _worker_maker = DefectBatchMaker(task, image_size, blend_prob, saliency)


def _make(chunk: list[dict]) -> dict:
    return _worker_maker({k: np.array([r[k] for r in chunk]) for k in chunk[0]})


def local_batches(rows: list[dict], micro_batch: int, *, task: str, image_size: int, blend_prob: float,
                  saliency: str, workers: int = 1) -> Iterator[dict]:
    """Micro-batches of DefectMaker samples made from stream rows (`defect_items`) in this process, or
    in a pool of `workers` processes (> 1), in the order Ray Data's ordered stream yields them; the last
    partial micro-batch is dropped as there."""
    chunks = [rows[i:i + ROWS_PER_MAKER_CALL] for i in range(0, len(rows), ROWS_PER_MAKER_CALL)]
    maker_args = (task, image_size, blend_prob, saliency)
    if workers > 1:
        import multiprocessing

        # spawn, not fork: the parent holds torch's thread pools (and CUDA on a GPU machine)
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, maker_args)
        made = pool.imap(_make, chunks)  # in order, computed ahead
    else:
        pool, maker = None, DefectBatchMaker(*maker_args)
        made = (maker({k: np.array([r[k] for r in chunk]) for k in chunk[0]}) for chunk in chunks)
    try:
        images: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        pending = 0
        for out in made:
            images.append(out["image"])
            labels.append(out["label"])
            pending += len(out["label"])
            while pending >= micro_batch:
                image, label = np.concatenate(images), np.concatenate(labels)
                yield {"image": torch.from_numpy(image[:micro_batch]),
                       "label": torch.from_numpy(label[:micro_batch])}
                images, labels = [image[micro_batch:]], [label[micro_batch:]]
                pending -= micro_batch
    finally:
        if pool is not None:
            pool.terminate()


def train_in_process(settings: TrainLoopSettings, paths: list[str], image_size: int,
                     device: str | torch.device = "cpu") -> dict:
    """Train (or resume) one worker's run in this process; checkpoints go to `settings.run_dir`.

    The rows, their order, the seed and the loop are the ones a one-worker Ray Train run uses, so both
    give the same weights. Returns the last step's metrics.
    """
    from reb_dist.io.atomic import copy_atomic

    f = settings.finetune
    device = torch.device(device)
    run_dir = Path(settings.run_dir)
    model, optimizer, start_step = build_model(settings, device)
    first, count = stream_window(f, start_step, len(settings.class_names), workers=1)
    batches = local_batches(defect_items(paths, first, count, f.seed), f.micro_batch, task=f.task,
                            image_size=image_size, blend_prob=f.blend_prob, saliency=f.saliency,
                            workers=f.data_workers)
    last: dict = {}

    def keep(metrics: dict, checkpoint: Path | None) -> None:
        nonlocal last
        last = metrics
        if checkpoint is not None:  # the backbone file last: latest_checkpoint needs both files
            target = run_dir / "checkpoints" / f"checkpoint_{metrics['step']:06d}"
            for name in (STATE_FILE, BACKBONE_FILE):
                copy_atomic(checkpoint / name, target / name)
        log.info("step %d/%d: loss %.4f, accuracy %.3f", metrics["step"], f.steps, metrics["loss"],
                 metrics["accuracy"])

    train_steps(settings, model, optimizer, batches, start_step, report=keep, device=device)
    return last
