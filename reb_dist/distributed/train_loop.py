"""The per-worker function Ray Train runs: `train_steps` (reb_dist.pipelines.ssl_training) on DDP and
the worker's shard of the Ray Data stream, reporting each step and checkpoint to Ray Train.

The loop, its settings and its checkpoint format live only in the Ray-free module, so a one-process
run and a Ray Train run cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reb_dist.pipelines.ssl_training import TrainLoopSettings, build_model, train_steps


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function; `config["settings"]` is a `TrainLoopSettings`."""
    import ray.train
    import ray.train.torch

    settings: TrainLoopSettings = config["settings"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model, optimizer, start_step = build_model(settings, device, rank)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(batch_size=settings.finetune.micro_batch, drop_last=True,
                                       dtypes={"image": torch.uint8, "label": torch.int64, "index": torch.int64})

    def report(metrics: dict, checkpoint: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None)

    train_steps(settings, model, optimizer, iter(batches), start_step, report=report, device=device,
                rank=rank, workers=world, forward=ddp_model)
