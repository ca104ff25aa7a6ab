"""The per-worker training loop Ray Train runs: REB's self-supervised fine-tuning.

One step = one optimiser update over `images_per_step` images (all workers together), accumulated
over micro-batches; SGD with momentum, cosine decay, backbone frozen for the first `freeze_steps`.
Rank 0 writes a checkpoint every `checkpoint_every` steps; a restarted run (a new command, or Ray
Train's retry after a worker died) continues from the newest one with the same data order, because
every sample's seed depends only on its global index.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reb_dist.config import FinetuneConfig
from reb_dist.core.backbones import build_backbone
from reb_dist.io.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from reb_dist.core.ssl_model import SSLClassifier

STATE_FILE = "train_state.pt"
BACKBONE_FILE = "backbone.safetensors"
KILLED_MARKER = "killed_worker_at_step"  # testing: kill_worker_at_step already fired in this run folder


@dataclass(frozen=True)
class TrainLoopSettings:
    """What every Ray Train worker needs: the typed fine-tuning settings and the run's facts."""

    finetune: FinetuneConfig
    backbone: str  # registry name
    weights: str | None  # start weights (None: ImageNet)
    class_names: tuple[str, ...]
    metrics_file: str | None = None  # rank 0 appends one JSON line per step
    # The run folder: every start of the loop (a new command or a retry) resumes from its newest
    # complete checkpoint, the same scan that places the start of the data stream, so the model and the
    # stream cannot disagree (Ray's own latest checkpoint can lag: a worker killed right after
    # reporting takes the report with it, while the checkpoint is already on disk).
    run_dir: str | None = None
    kill_worker_at_step: int | None = None  # testing: rank 0 SIGKILLs itself after this step, once per run_dir


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


def cosine_lr(step: int, total: int, base: float) -> float:
    """The cosine-decayed learning rate at `step` of `total` from `base`."""
    return 0.5 * base * (1 + math.cos(math.pi * min(step, total) / total))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """"ce" as the paper writes; "bce" (sigmoid per class on one-hot targets) as the authors' code."""
    if kind == "ce":
        return F.cross_entropy(logits, labels)
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[1]).float())


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function; `config["settings"]` is a `TrainLoopSettings`."""
    import ray.train
    import ray.train.torch

    settings: TrainLoopSettings = config["settings"]
    f = settings.finetune
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(f.seed + rank)
    torch.set_num_threads(max(1, f.torch_threads))
    device = ray.train.torch.get_device()

    backbone = build_backbone(settings.backbone, settings.weights)
    model = SSLClassifier(backbone, len(settings.class_names), bn_stats=f.bn_stats).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    backbone_params = list(model.net.parameters())
    head_params = list(model.head.parameters())
    optimizer = torch.optim.SGD(
        [{"params": backbone_params, "name": "backbone"}, {"params": head_params, "name": "head"}],
        lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)

    start_step = 0
    checkpoint_dir = latest_checkpoint(Path(settings.run_dir))[0] if settings.run_dir else None
    if checkpoint_dir is not None:
        state = torch.load(checkpoint_dir / STATE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        if rank == 0:
            print(f"resuming from step {start_step}: {checkpoint_dir}", flush=True)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)

    steps, freeze = f.steps, f.freeze_steps
    micro = f.micro_batch
    micro_per_step = micro_batches_per_step(f.images_per_step, micro, world)
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(batch_size=micro, drop_last=True,
                                       dtypes={"image": torch.uint8, "label": torch.int64, "index": torch.int64})
    batch_iter = iter(batches)
    n_classes = len(settings.class_names)
    ddp_model.train()
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        frozen = step < freeze
        for group in optimizer.param_groups:
            lr = cosine_lr(step, steps, f.lr)
            group["lr"] = 0.0 if (frozen and group["name"] == "backbone") else lr
        optimizer.zero_grad(set_to_none=True)
        correct = np.zeros(n_classes)
        seen = np.zeros(n_classes)
        loss_sum, n_images = 0.0, 0
        for _ in range(micro_per_step):
            try:
                batch = next(batch_iter)
            except StopIteration:
                raise RuntimeError(f"the DefectMaker stream ran out at step {step}: it must hold "
                                   f"steps x images_per_step rows") from None
            images = normalise(batch["image"].to(device))
            labels = batch["label"].to(device)
            logits = ddp_model(images)
            loss = loss_fn(logits, labels, f.loss)
            (loss / micro_per_step).backward()
            loss_sum += float(loss) * len(labels)
            n_images += len(labels)
            pred = logits.argmax(1).cpu().numpy()
            lab = labels.cpu().numpy()
            np.add.at(seen, lab, 1)
            np.add.at(correct, lab, pred == lab)
        if frozen:  # weight decay and momentum must not move a frozen backbone either
            for p in backbone_params:
                p.grad = None
        optimizer.step()

        done = step + 1
        metrics = {"step": done, "loss": loss_sum / max(n_images, 1),
                   "accuracy": float(correct.sum() / max(seen.sum(), 1)),
                   "lr": cosine_lr(step, steps, f.lr), "backbone_frozen": float(frozen),
                   "images_per_second_worker": n_images / (time.perf_counter() - t0)}
        metrics.update({f"accuracy/{name}": float(correct[i] / seen[i])
                        for i, name in enumerate(settings.class_names) if seen[i]})
        if rank == 0 and settings.metrics_file:  # the full history, for MLflow and plots
            Path(settings.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            with open(settings.metrics_file, "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
        is_checkpoint = done % f.checkpoint_every == 0 or done == steps
        if is_checkpoint:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": done}, Path(tmp) / STATE_FILE)
                    from safetensors.torch import save_file

                    save_file(model.backbone_state_dict(), str(Path(tmp) / BACKBONE_FILE),
                              {"backbone": settings.backbone, "step": str(done)})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
        if settings.kill_worker_at_step == done and rank == 0 and settings.run_dir:
            kill_once(Path(settings.run_dir) / f"{KILLED_MARKER}_{done}")
        if f.fail_at_step == done:
            raise RuntimeError(f"interrupted on purpose after step {done} (fail_at_step)")
