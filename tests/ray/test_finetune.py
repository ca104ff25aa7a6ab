"""DefectMaker on Ray Data workers and REB's fine-tuning on Ray Train, on a real local Ray cluster."""

import json

import numpy as np
import torch
import pytest
import ray

from reb_dist.core.backbones import build_backbone
from reb_dist.config import SAMPLE_DATA, RunConfig
from reb_dist.distributed.defect_stream import defect_dataset
from reb_dist.pipelines.defect_batches import DefectBatchMaker, defect_items
from reb_dist.errors import RebError
from reb_dist.distributed.finetune import KILL_WORKER_ENV, finetune, fit_cpus, latest_checkpoint, read_metrics
from reb_dist.pipelines.ssl_training import KILLED_MARKER

TRAIN = sorted(str(p) for p in (SAMPLE_DATA / "bottle" / "train" / "good").glob("*.png"))


def test_same_seed_gives_the_same_samples_on_two_ray_workers(local_ray):
    rows = defect_items(TRAIN, start=5, count=2, run_seed=7)
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    Maker = ray.remote(num_cpus=0.5)(DefectBatchMaker)
    a, b = (Maker.remote("defectmaker", 64, 0.5, "spectral") for _ in range(2))
    out_a, out_b = ray.get([a.__call__.remote(batch), b.__call__.remote(batch)])
    assert out_a["image"].shape == (14, 64, 64, 3)  # 2 base images x 7 classes
    assert list(out_a["label"]) == list(range(7)) * 2
    assert np.array_equal(out_a["image"], out_b["image"])
    other = defect_items(TRAIN, start=5, count=2, run_seed=8)
    out_c = DefectBatchMaker("defectmaker", 64, 0.5, "spectral")(
        {k: np.array([r[k] for r in other]) for k in other[0]})
    assert not np.array_equal(out_a["image"], out_c["image"])


def test_stream_is_a_lazy_ray_dataset_of_every_class(local_ray):
    ds = defect_dataset(TRAIN, 0, 3, task="cutpaste", image_size=64, blend_prob=0.5, saliency="whole",
                        run_seed=0, data_workers=1, data_cpus=0.5)
    rows = ds.take_all()
    assert len(rows) == 9 and sorted({r["label"] for r in rows}) == [0, 1, 2]
    assert rows[0]["image"].dtype == np.uint8


# the plan asks more CPUs than the session's Ray has (2 workers x 2 + 1 DefectMaker actor x 0.5 = 4.5 of
# 4), as two workers of one CPU do on a 2-CPU cluster: unfitted, the actor never starts and training waits for ever
FINETUNE_SETTINGS = ["data.categories=[bottle]", "data.image_size=64", "finetune.steps=4",
                     "finetune.images_per_step=28", "finetune.micro_batch=14", "finetune.freeze_steps=1",
                     "finetune.checkpoint_every=2", "finetune.cpus_per_worker=2", "finetune.data_workers=1",
                     "finetune.num_workers=2", "finetune.run_name=t"]


def test_a_plan_larger_than_the_cluster_is_scaled_to_fit_it(caplog):
    assert fit_cpus(4, 2, 1.0, 2, 0.5) == (1.0, 0.5)  # fits: unchanged
    worker, actor = fit_cpus(2, 2, 1.0, 2, 0.5)  # 3 CPUs asked of 2
    assert 2 * worker + 2 * actor <= 2 and worker == pytest.approx(2 / 3, abs=1e-3) and actor == pytest.approx(1 / 3, abs=1e-3)
    assert "the Ray cluster has 2 CPUs, the fine-tuning plan asks 3" in caplog.text
    worker, actor = fit_cpus(4, 2, 2.0, 1, 0.5)
    assert 2 * worker + actor <= 4
    with pytest.raises(RebError, match="no CPUs"):
        fit_cpus(0, 2, 1.0, 2, 0.5)


# 75 s on idle cores; with a benchmark holding both cores beside it, over 600 s (the suite's default
# timeout) on 2026-12-06: the timeout catches hangs, so give a busy machine its time
@pytest.mark.timeout(1800)
def test_two_worker_finetune_is_interrupted_resumes_survives_a_killed_worker_and_feeds_the_detector(
        local_ray, tmp_path, monkeypatch):
    """One run of the smallest two-worker settings goes through every way a run stops: stopped
    (fail_at_step, no retry), resumed by the same command, a worker SIGKILLed (as an OOM kill) in the
    resumed run and retried by Ray Train from the newest checkpoint, then reused once finished.
    (The killed worker used to be a test of its own on a fresh run of these settings: a whole
    Ray Train start more for the same checks.)"""
    import reb_dist.distributed.finetune as driver

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "backbone.safetensors"
    run_dir = tmp_path / "ray" / "t"
    storage = f"finetune.storage_path={tmp_path / 'ray'}"
    interrupted = RunConfig.load(None, FINETUNE_SETTINGS + [storage, "finetune.fail_at_step=2"])
    with pytest.raises(Exception, match="interrupted on purpose"):
        finetune(interrupted, "bottle", out)
    assert not out.exists()
    assert latest_checkpoint(run_dir)[1] == 2

    # the same command again resumes; this time through the CLI, logging to MLflow. In it rank 0
    # dies (SIGKILL) after step 3, past the checkpoint of step 2, and Ray Train retries the workers
    from reb_dist.cli import main

    monkeypatch.setenv(KILL_WORKER_ENV, "3")
    trained = []  # what the trainer returned (FinetuneResult.final_metrics of the resumed run)
    train = driver._train
    monkeypatch.setattr(driver, "_train", lambda *args, **kwargs: trained.append(train(*args, **kwargs)) or trained[-1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["finetune", "-o", str(out), "--set", f"tracking.uri={uri}", "--set", storage]
    assert main(args + [a for s in FINETUNE_SETTINGS for a in ("--set", s)]) == 0
    monkeypatch.delenv(KILL_WORKER_ENV)
    assert (run_dir / f"{KILLED_MARKER}_3").is_file()  # a worker did die
    assert len(trained) == 1 and trained[0]["step"] == 4
    # rank 0's raw log: the stopped run did steps 1-2, the resumed one 3, then died; the retry resumed
    # at the checkpoint of step 2 (so redid 3, then 4); a retry from scratch would log 1, 2, 3, 1, 2, 3, 4
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 3, 4]
    assert latest_checkpoint(run_dir)[1] == 4
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert out.is_file() and not list(tmp_path.glob("*.tmp"))

    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id])[0]
    assert run.data.params["finetune.steps"] == "4"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert "accuracy/normal" in run.data.metrics and "accuracy/bezier_cut_paste" in run.data.metrics
    assert "plots/defect_gallery.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}

    tuned = build_backbone("efficientnet_lite0", weights=out)
    assert tuned.fingerprint != build_backbone("efficientnet_lite0").fingerprint  # it did train

    # a finished run is not trained again: its backbone is only copied out
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run started a trainer")

    monkeypatch.setattr(driver, "_train", no_training)
    out.unlink()
    assert finetune(RunConfig.load(None, FINETUNE_SETTINGS + [storage]), "bottle", out).resumed_from_step == 4
    assert build_backbone("efficientnet_lite0", weights=out).fingerprint == tuned.fingerprint

    # the same run name with a different training setting is refused, not silently reused
    out.unlink()
    with pytest.raises(RebError, match=r"finetune.bn_stats: 'update' -> 'frozen'.*finetune.run_name"):
        finetune(RunConfig.load(None, FINETUNE_SETTINGS + [storage, "finetune.bn_stats=frozen"]), "bottle", out)
    assert not out.exists()
    # while a setting that only says where and how fast it trains may change
    assert finetune(RunConfig.load(None, FINETUNE_SETTINGS + [storage, "finetune.checkpoint_every=1"]),
                    "bottle", out).resumed_from_step == 4

    # REB (fine-tuned + LDKNN) and DefectMaker (fine-tuned + KNN) next to LDKNN and KNN; at 128 px (a
    # quarter of the default's pixels): what is compared is the same images through two backbones
    SMALL = ["--set", "data.image_size=128"]
    assert main(["benchmark", "--no-mlflow", "--categories", "bottle", "--methods", "ldknn,knn", "--set", "data.few_shot=8",
                 "--set", f"backbone.finetuned={out}", "--set", "output_dir=bench", *SMALL]) == 0

    rows = json.loads((tmp_path / "bench" / "benchmark" / "results.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"ldknn(k=9,alpha=1)", "knn(k=9)", "defectmaker+ldknn(k=9,alpha=1)",
                                           "defectmaker+knn(k=9)"}
    # the plain rows are what a benchmark without the fine-tuned backbone gives; the defectmaker+ rows
    # are not (their backbone did change)
    assert main(["benchmark", "--no-mlflow", "--categories", "bottle", "--methods", "ldknn,knn", "--set", "data.few_shot=8",
                 "--set", "output_dir=plain", *SMALL]) == 0
    plain = {r["method"]: r["metrics"]
             for r in json.loads((tmp_path / "plain" / "benchmark" / "results.json").read_text())["results"]}
    got = {r["method"]: r["metrics"] for r in rows}
    assert set(plain) == {"ldknn(k=9,alpha=1)", "knn(k=9)"}
    for method, metrics in plain.items():
        assert {"image_auroc", "pixel_auroc", "aupro"} <= set(metrics)
        assert got[method] == pytest.approx(metrics, rel=1e-6, abs=1e-9)
        assert got[f"defectmaker+{method}"].keys() == metrics.keys()
        assert got[f"defectmaker+{method}"] != pytest.approx(metrics, rel=1e-6, abs=1e-9)


def test_one_process_loop_and_ray_train_give_the_same_weights(local_ray, tmp_path):
    """finetune.engine=local runs the loop Ray Train runs, on the same rows in the same order: with one
    Ray worker and the same seed, two steps end in the same weights."""
    from safetensors.torch import load_file

    one_worker = ["data.categories=[bottle]", "data.image_size=64", "finetune.steps=2", "finetune.images_per_step=14",
                  "finetune.micro_batch=7", "finetune.freeze_steps=0", "finetune.checkpoint_every=2",
                  "finetune.num_workers=1", "finetune.data_workers=1", "finetune.cpus_per_worker=0.5",
                  "finetune.use_gpu=false", f"finetune.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"]
    weights = {}
    for engine in ("ray", "local"):
        cfg = RunConfig.load(None, one_worker + [f"finetune.engine={engine}", f"finetune.run_name={engine}"])
        finetune(cfg, "bottle", tmp_path / f"{engine}.safetensors")
        weights[engine] = load_file(str(tmp_path / f"{engine}.safetensors"))
    start = build_backbone("efficientnet_lite0").model.net.state_dict()
    assert not torch.equal(weights["ray"]["blocks.2.0.conv_pw.weight"], start["blocks.2.0.conv_pw.weight"])
    ray_steps = read_metrics(tmp_path / "runs" / "ray")
    local_steps = read_metrics(tmp_path / "runs" / "local")
    assert [m["loss"] for m in local_steps] == pytest.approx([m["loss"] for m in ray_steps], rel=1e-5)
    assert weights["ray"].keys() == weights["local"].keys()
    differ = {k: float((weights["local"][k].double() - v.double()).abs().max()) for k, v in weights["ray"].items()
              if not torch.allclose(weights["local"][k].double(), v.double(), rtol=1e-5, atol=1e-6)}
    assert not differ, f"{len(differ)} of {len(weights['ray'])} tensors differ; largest: {sorted(differ.items(), key=lambda kv: -kv[1])[:3]}"


def _loop_until_aborted(config):
    """A training loop that says it has started, then reports until Ray Train aborts it."""
    import time
    from pathlib import Path

    import ray.train

    Path(config["started"]).touch()
    for step in range(600):
        ray.train.report({"step": step})
        time.sleep(0.1)


def test_ctrl_c_aborts_the_ray_train_run_then_is_a_keyboard_interrupt(local_ray, tmp_path):
    # Ray Train v2's SIGINT handler aborts the run, then raises SystemExit(0): `reb finetune` exited
    # with status 1 and no word, and the handler stayed set after the fit
    import os
    import signal
    import threading
    import time

    import ray.train
    from ray.train.torch import TorchTrainer

    from reb_dist.distributed.finetune import fit_trainer

    started = tmp_path / "started"

    def ctrl_c_once_started():
        deadline = time.monotonic() + 300
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    trainer = TorchTrainer(_loop_until_aborted, train_loop_config={"started": str(started)},
                           scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=ray.train.RunConfig(name="aborted", storage_path=str(tmp_path / "ray")))
    # Ctrl-C as in a terminal, however pytest was started (a shell's background job ignores SIGINT)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=ctrl_c_once_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt, match="aborted the run"):
            fit_trainer(trainer)
        assert started.exists()
        # a later Ctrl-C is not sent to the ended run
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)
