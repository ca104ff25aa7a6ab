"""A fine-tuning worker that dies (SIGKILL, as an OOM kill) is retried by Ray Train from the newest checkpoint."""

import json

from reb_dist.config import RunConfig
from reb_dist.distributed.finetune import KILL_WORKER_ENV, finetune, latest_checkpoint
from reb_dist.pipelines.ssl_training import KILLED_MARKER

# the smallest run of tests/ray/test_finetune.py: 4 steps, a checkpoint every 2, two DDP workers
SETTINGS = ["data.categories=[bottle]", "data.image_size=64", "finetune.steps=4", "finetune.images_per_step=28",
            "finetune.micro_batch=14", "finetune.freeze_steps=1", "finetune.checkpoint_every=2",
            "finetune.cpus_per_worker=0.5", "finetune.data_workers=1", "finetune.num_workers=2",
            "finetune.run_name=k"]


def test_a_killed_worker_is_retried_from_the_newest_checkpoint(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # rank 0 dies after step 3, past the checkpoint of step 2
    monkeypatch.setenv(KILL_WORKER_ENV, "3")
    run_dir = tmp_path / "ray" / "k"
    out = tmp_path / "backbone.safetensors"
    cfg = RunConfig.load(None, SETTINGS + [f"finetune.storage_path={tmp_path / 'ray'}"])

    result = finetune(cfg, "bottle", out)

    assert (run_dir / f"{KILLED_MARKER}_3").is_file()  # a worker did die
    assert out.is_file() and latest_checkpoint(run_dir)[1] == 4
    assert result.final_metrics["step"] == 4
    # rank 0's raw log: the first attempt did steps 1-3, the retry resumed at the checkpoint of step 2
    # (so redid 3, then 4); a retry from scratch would log 1, 2, 3, 1, 2, 3, 4
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 3, 4]
