"""REB's fine-tuning loop in one process, without Ray (finetune.engine=local)."""

import pytest
import torch
from safetensors.torch import load_file

from reb_dist.config import RunConfig
from reb_dist.core.backbones import build_backbone
from reb_dist.distributed.finetune import finetune, read_metrics
from reb_dist.errors import RebError
from reb_dist.pipelines.ssl_training import latest_checkpoint

# 2 steps of 2 micro-batches of 7 (one sample per DefectMaker class), 64 px: seconds on a CPU
LOCAL = ["data.categories=[bottle]", "data.image_size=64", "finetune.engine=local", "finetune.data_workers=1",
         "finetune.steps=2", "finetune.images_per_step=14", "finetune.micro_batch=7", "finetune.freeze_steps=0",
         "finetune.checkpoint_every=1", "tracking.enabled=false"]


def _finetune(tmp_path, name, *extra):
    cfg = RunConfig.load(None, LOCAL + [f"finetune.storage_path={tmp_path / 'runs'}", f"finetune.run_name={name}",
                                        *extra])
    out = tmp_path / f"{name}.safetensors"
    finetune(cfg, "bottle", out)
    return load_file(str(out))


def test_frozen_bn_stats_leave_every_running_statistic_bit_identical(tmp_path):
    start = build_backbone("efficientnet_lite0").model.net.state_dict()
    statistics = [k for k in start if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(statistics) > 50  # every BatchNorm of the network, not one layer

    frozen = _finetune(tmp_path, "frozen", "finetune.bn_stats=frozen")
    assert all(torch.equal(frozen[k], start[k]) for k in statistics)
    assert not torch.equal(frozen["blocks.2.0.conv_pw.weight"], start["blocks.2.0.conv_pw.weight"])  # it trained

    updated = _finetune(tmp_path, "update", "finetune.bn_stats=update")
    assert sum(not torch.equal(updated[k], start[k]) for k in statistics) > len(statistics) // 2


def test_an_interrupted_local_run_resumes_to_the_same_weights(tmp_path):
    whole = _finetune(tmp_path, "whole")
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        _finetune(tmp_path, "resumed", "finetune.fail_at_step=1")
    assert latest_checkpoint(tmp_path / "runs" / "resumed")[1] == 1
    resumed = _finetune(tmp_path, "resumed")  # the same command again: steps 2.. only
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "resumed")] == [1, 2]
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_local_engine_refuses_use_gpu_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RebError, match="use_gpu=true"):
        _finetune(tmp_path, "gpu", "finetune.use_gpu=true")


def test_finetune_evaluates_every_checkpoint_into_a_learning_curve(tmp_path, monkeypatch):
    """finetune.evaluate_checkpoints: the start weights and each checkpoint scored on the test set, in
    MLflow (step = images seen) and learning_curve.json/png."""
    import json

    import mlflow

    from reb_dist.cli import main
    from reb_dist.pipelines.evaluate import evaluate_category

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = [s for s in LOCAL if not s.startswith("tracking")] + [
        "data.few_shot=6", "scoring.methods=[knn]", "finetune.evaluate_checkpoints=true",
        f"finetune.storage_path={tmp_path / 'runs'}", f"tracking.uri={uri}", "output_dir=out", "cache.enabled=false"]
    assert main(["finetune", "-o", "b.safetensors"] + [a for s in settings for a in ("--set", s)]) == 0

    curve = json.loads((tmp_path / "out" / "finetune" / "bottle" / "learning_curve.json").read_text())
    rows = curve["checkpoints"]
    assert [(r["step"], r["images_seen"]) for r in rows] == [(0, 0), (1, 14), (2, 28)]
    assert (tmp_path / "out" / "finetune" / "bottle" / "learning_curve.png").stat().st_size > 10_000
    # step 0 is the start weights: what a plain run of the same method gives
    plain = evaluate_category(RunConfig.load(None, settings), "bottle").methods[0].metrics
    assert rows[0]["image_auroc"] == pytest.approx(plain["image_auroc"])
    assert rows[0]["aupro"] == pytest.approx(plain["aupro"])
    assert rows[2]["aupro"] != pytest.approx(plain["aupro"], rel=1e-6)  # the trained backbone scores otherwise

    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "curve/knn/aupro")
    assert [(m.step, m.value) for m in history] == [(r["images_seen"], pytest.approx(r["aupro"])) for r in rows]
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curve.png", "plots/ssl_confusion.png"} <= plots


def test_each_step_records_the_ssl_confusion_matrix_behind_its_accuracies(tmp_path):
    import json

    import numpy as np

    from reb_dist.core.defectmaker import DefectMaker
    from reb_dist.pipelines.learning_curve import write_confusion

    _finetune(tmp_path, "confusion", "finetune.steps=4", "finetune.checkpoint_every=4")
    rows = read_metrics(tmp_path / "runs" / "confusion")
    names = list(DefectMaker(task="defectmaker", image_size=64).classes)
    for row in rows:
        counts = np.array(row["confusion"])  # [true class][predicted class]
        assert counts.shape == (7, 7) and counts.sum() == 14  # every image of the step, once
        assert np.trace(counts) / counts.sum() == pytest.approx(row["accuracy"])
        for i, name in enumerate(names):
            assert counts[i, i] / counts[i].sum() == pytest.approx(row[f"accuracy/{name}"])

    written = write_confusion(rows, names, tmp_path / "out", "bottle")
    data = json.loads(written[0].read_text())
    first, last = data["windows"]  # a quarter of 4 steps each: step 1 and step 4
    assert (first["first_step"], first["last_step"], last["first_step"], last["last_step"]) == (1, 1, 4, 4)
    assert first["counts"] == rows[0]["confusion"] and last["counts"] == rows[-1]["confusion"]
    assert written[1].stat().st_size > 10_000


def test_a_pool_of_defectmaker_processes_yields_the_same_batches_in_the_same_order():
    from reb_dist.config import SAMPLE_DATA
    from reb_dist.pipelines.defect_batches import defect_items
    from reb_dist.pipelines.ssl_training import local_batches

    paths = sorted(str(p) for p in (SAMPLE_DATA / "bottle" / "train" / "good").glob("*.png"))
    rows = defect_items(paths, 3, 10, run_seed=5)  # 70 samples: 7 micro-batches of 9, the rest dropped
    kwargs = dict(task="defectmaker", image_size=48, blend_prob=0.5, saliency="spectral")
    alone = list(local_batches(rows, 9, **kwargs))
    pooled = list(local_batches(rows, 9, workers=2, **kwargs))
    assert len(alone) == len(pooled) == 7
    for a, b in zip(alone, pooled):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(alone[0]["image"], alone[1]["image"])


def test_the_gpu_script_trains_without_ray_faiss_or_mlflow(tmp_path):
    """bench/finetune_gpu.py (the paper's schedule on a lone GPU machine), as a CPU smoke run: it writes
    the backbone and the SSL curve, and never imports what such a machine may lack."""
    import subprocess
    import sys
    from pathlib import Path

    from reb_dist.config import SAMPLE_DATA

    script = Path(__file__).resolve().parents[3] / "bench" / "finetune_gpu.py"
    args = ["--root", str(SAMPLE_DATA), "--category", "bottle", "--out", str(tmp_path / "gpu"), "--device", "cpu",
            "--steps", "2", "--images-per-step", "14", "--micro-batch", "7", "--image-size", "64",
            "--freeze-steps", "0", "--data-workers", "1", "--checkpoint-every", "1"]
    code = (f"import runpy, sys; sys.argv = {[str(script)] + args!r}\n"
            f"try:\n    runpy.run_path({str(script)!r}, run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
            "print('IMPORTED', sorted(m for m in ('ray', 'faiss', 'mlflow', 'optuna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "IMPORTED []" in done.stdout
    assert "bottle: 2 steps, 28 images" in done.stdout
    trained = load_file(str(tmp_path / "gpu" / "backbone.safetensors"))
    start = build_backbone("efficientnet_lite0").model.net.state_dict()
    assert not torch.equal(trained["blocks.2.0.conv_pw.weight"], start["blocks.2.0.conv_pw.weight"])
    assert (tmp_path / "gpu" / "ssl_curve.png").is_file() and (tmp_path / "gpu" / "ssl_confusion.png").is_file()


def test_a_checkpoint_cut_short_is_passed_over_on_resume(tmp_path):
    """A run stopped while its checkpoint was being copied leaves a truncated train_state.pt: resuming
    takes the previous checkpoint instead of failing on it."""
    trained = _finetune(tmp_path, "run")
    run_dir = tmp_path / "runs" / "run"
    newest, step = latest_checkpoint(run_dir)
    assert step == 2
    state = newest / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    older, older_step = latest_checkpoint(run_dir)
    assert older_step == 1 and older != newest
    again = _finetune(tmp_path, "run")  # trains step 2 again from step 1's checkpoint: the same weights
    assert all(torch.equal(trained[k], again[k]) for k in trained)



def test_a_run_being_trained_by_another_process_is_refused_not_trained_twice(tmp_path):
    # two `reb finetune` of one run at once both trained into its folder: each step's metrics logged
    # twice, checkpoints written by either in turn, both exit 0
    from tests.lock_holder import lock_held_elsewhere

    (tmp_path / "runs").mkdir()
    with lock_held_elsewhere(tmp_path / "runs" / "busy.lock"):
        with pytest.raises(RebError, match=r"busy: another process is training this run now.*finetune.run_name"):
            _finetune(tmp_path, "busy")
        assert not (tmp_path / "runs" / "busy").exists() and not (tmp_path / "busy.safetensors").exists()
    _finetune(tmp_path, "busy")  # the holder gone, the same command trains
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "busy")] == [1, 2]
