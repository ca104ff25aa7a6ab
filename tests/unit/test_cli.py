"""The `reb` command line end to end on the shipped real subset, with a real MLflow sqlite store."""

import json
import re
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from reb_dist.cli import main
from reb_dist.config import SAMPLE_DATA, RunConfig
from reb_dist.pipelines.evaluate import evaluate_category


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_benchmark_prints_table_writes_results_and_logs_to_mlflow(workdir, capsys):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    rc = main(["benchmark", "--categories", "bottle", "--methods", "ldknn,knn", "--set", f"tracking.uri={uri}",
               "--set", "tracking.heatmap_examples=4", "--set", "output_dir=out"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ldknn(k=9,alpha=1)" in printed and "knn(k=9)" in printed and "image_auroc" in printed
    out = workdir / "out" / "benchmark"
    assert {"results.md", "results.json", "config.yaml", "roc_bottle.png", "heatmaps_bottle.png"} <= {
        p.name for p in out.iterdir()}
    assert "Command: `reb benchmark" in (out / "results.md").read_text()

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("reb-dist")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("command") == "benchmark"]
    children = [r for r in runs if r.data.tags.get("category") == "bottle"]
    assert len(parent) == 1 and parent[0].data.params["scoring.k"] == "9"
    assert {r.data.tags["method"] for r in children} == {"ldknn(k=9,alpha=1)", "knn(k=9)"}
    for r in children:  # each result run carries every resolved setting, so the UI filters and compares by them
        assert r.data.tags["backbone"] == "efficientnet_lite0" and r.data.tags["preset"] == "auto"
        assert parent[0].data.params.items() <= r.data.params.items()
        assert r.data.params["mode"] == "exact"
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id, "plots")}
    assert "plots/roc_bottle.png" in artifacts and "plots/heatmaps_bottle.png" in artifacts

    # the numbers: results.json, MLflow and the in-process API with the same settings agree per method,
    # and the image AUROC is scikit-learn's on the in-process image scores
    rows = json.loads((out / "results.json").read_text())["results"]
    written = {r["method"]: r["metrics"] for r in rows}
    assert {"image_auroc", "pixel_auroc", "aupro"} <= set(written["knn(k=9)"])
    assert written["ldknn(k=9,alpha=1)"] != written["knn(k=9)"]  # so a swap of methods shows
    for r in children:  # MLflow names allow alphanumerics and _-. :/ only ("group=x" -> "group_x")
        assert r.data.metrics == {re.sub(r"[^A-Za-z0-9_\-. :/]", "_", k): v
                                  for k, v in written[r.data.tags["method"]].items()}
    cfg = RunConfig.load(None, ["scoring.methods=[ldknn,knn]", "tracking.enabled=false"])
    result = evaluate_category(cfg, "bottle")
    assert {result.label(m.method) for m in result.methods} == set(written)
    for m in result.methods:
        assert written[result.label(m.method)] == pytest.approx(m.metrics, rel=1e-6, abs=1e-9)
        assert written[result.label(m.method)]["image_auroc"] == pytest.approx(
            roc_auc_score(result.labels, m.image_scores), abs=1e-12)


def test_fit_evaluate_predict_round_trip(workdir, capsys):
    model = workdir / "bottle.safetensors"
    assert main(["fit", "--no-mlflow", "--categories", "bottle", "-o", str(model)]) == 0
    assert model.is_file() and not list(workdir.glob("*.tmp"))
    assert main(["evaluate", "--no-mlflow", "--categories", "bottle", "-m", str(model),
                 "--set", "output_dir=out"]) == 0
    assert "ldknn(k=9,alpha=1)" in capsys.readouterr().out

    good = SAMPLE_DATA / "bottle" / "test" / "good" / "000.png"
    bad = SAMPLE_DATA / "bottle" / "test" / "broken_large" / "000.png"
    assert main(["predict", "-m", str(model), str(good), str(bad), "-o", "pred", "--threshold", "0"]) == 0
    lines = (workdir / "pred" / "scores.csv").read_text().splitlines()
    scores = {Path(line.split(",")[0]).parent.name: float(line.split(",")[1]) for line in lines[1:]}
    assert scores["broken_large"] > scores["good"]
    overlay = np.asarray(Image.open(workdir / "pred" / "000_heatmap.png"))
    w, h = Image.open(bad).size
    # annotated: the overlay at the image's size, a colour bar right of it (jet: 1 on top, 0 at the
    # bottom), the nearest training image beside, and a caption under it all
    assert overlay.shape[0] > h and overlay.shape[1] > 2 * w
    from matplotlib import colormaps
    top, bottom = (colormaps["jet"](v, bytes=True)[:3] for v in (1.0, 0.0))
    assert any((overlay[0, x] == top).all() and (overlay[h - 1, x] == bottom).all() for x in range(w, w + 40))


def test_bad_image_fails_clearly_and_leaves_no_model(workdir, capsys):
    data = workdir / "data"
    shutil.copytree(SAMPLE_DATA / "bottle", data / "bottle")
    broken = data / "bottle" / "train" / "good" / "014.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated PNG
    rc = main(["fit", "--no-mlflow", "--root", str(data), "--categories", "bottle", "-o", "m.safetensors"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "014.png" in err
    assert not (workdir / "m.safetensors").exists() and not list(workdir.glob("m.safetensors*"))


def test_unknown_setting_is_a_clear_error(workdir, capsys):
    assert main(["benchmark", "--no-mlflow", "--set", "scoring.kk=3"]) == 2
    assert "kk" in capsys.readouterr().err


def test_benchmark_on_a_custom_folder_layout(workdir, capsys):
    """A plain folder set (grayscale images, masks only for some defects) runs like MVTec AD."""
    src = SAMPLE_DATA / "bottle"
    root = workdir / "parts"
    for sub, dst in (("train/good", "train"), ("test/good", "test/normal"),
                     ("test/broken_large", "test/anomalous/broken"), ("test/contamination", "test/anomalous/dirt")):
        (root / dst).mkdir(parents=True)
        for p in sorted((src / sub).glob("*.png")):
            Image.open(p).convert("L").save(root / dst / p.name)  # grayscale, as many inspection cameras
    (root / "masks" / "broken").mkdir(parents=True)
    for p in sorted((src / "ground_truth" / "broken_large").glob("*.png")):
        shutil.copy(p, root / "masks" / "broken" / p.name)
    rc = main(["benchmark", "--no-mlflow", "--set", "data.layout=folder", "--root", str(root),
               "--set", "data.mask_dir=masks", "--methods", "ldknn,nn1", "--set", "output_dir=out"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "parts" in printed and "ldknn(k=9,alpha=1)" in printed
    results = json.loads((workdir / "out" / "benchmark" / "results.json").read_text())["results"]
    metrics = results[0]["metrics"]
    assert metrics["image_auroc"] > 0.8
    assert "image_auroc/broken" in metrics and "image_auroc/dirt" in metrics
    # only "broken" has masks: pixel metrics exist for it, and are not computed for "dirt"
    assert "pixel_auroc/broken" in metrics and "pixel_auroc/dirt" not in metrics


# --- version, --print-config, -q / -v ------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"reb-dist {metadata.version('reb-dist')}"


@pytest.mark.parametrize("command", ["benchmark", "fit", "tune", "cache"])
def test_print_config_prints_settings_that_load_back_the_same_and_runs_nothing(command, workdir, capsys):
    (workdir / "base.yaml").write_text("scoring: {k: 5}\nbank: {coreset_ratio: 0.5}\n")
    extra = ["info"] if command == "cache" else ["--preset", "fast", "--categories", "bottle", "--no-mlflow"]
    assert main([command, *extra, "-c", "base.yaml", "--set", "scoring.alpha=0.25", "--set",
                 "output_dir=out", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (workdir / "printed.yaml").write_text(printed)
    overrides = ["scoring.alpha=0.25", "output_dir=out"] + ([] if command == "cache" else [
        "preset=fast", "data.categories=bottle", "tracking.enabled=false"])
    expected = RunConfig.load(workdir / "base.yaml", overrides)
    assert RunConfig.load(workdir / "printed.yaml") == expected
    assert expected.scoring.k == 5 and expected.scoring.alpha == 0.25 != RunConfig().scoring.alpha
    assert not (workdir / "out").exists() and not (workdir / "outputs").exists()  # nothing ran


def test_quiet_hides_progress_and_verbose_shows_debug(workdir, capsys):
    # without the feature cache, every fit extracts features (and shows their bar unless quiet)
    fit = ["fit", "--no-mlflow", "--categories", "bottle", "--set", "data.few_shot=2", "--set", "cache.enabled=false"]
    assert main(["-v", *fit, "-o", "a.safetensors"]) == 0
    out, err = capsys.readouterr()
    assert "bottle: 2 images -> bank" in err and "debug: reb_dist.cli: settings:" in err
    assert "bottle train features" in err  # a progress bar
    assert out.splitlines() == ["a.safetensors"]  # where the model went, on stdout

    assert main([*fit, "-q", "-o", "c.safetensors"]) == 0
    out, err = capsys.readouterr()
    assert "images -> bank" not in err and "debug:" not in err
    assert "features" not in err  # -q hides the bars too
    assert out.splitlines() == ["c.safetensors"] and (workdir / "c.safetensors").is_file()  # quiet, not idle
    # the next command without -q shows them again
    assert main([*fit, "-o", "d.safetensors"]) == 0
    assert "bottle train features" in capsys.readouterr().err


def test_a_test_set_of_one_kind_reports_undefined_metrics_and_writes_everything_else(workdir, capsys):
    """Only good test images: the table printed, then the ROC plot raised a traceback (exit 1)."""
    root = workdir / "only_good"
    shutil.copytree(SAMPLE_DATA / "bottle" / "train", root / "bottle" / "train")
    shutil.copytree(SAMPLE_DATA / "bottle" / "test" / "good", root / "bottle" / "test" / "good")
    assert main(["benchmark", "--no-mlflow", "--root", str(root), "--categories", "bottle", "--methods", "ldknn,knn",
                 "--set", "data.few_shot=4", "--set", "cache.enabled=false", "--set", "output_dir=out"]) == 0
    captured = capsys.readouterr()
    assert "no ROC curve: the test set has only normal images" in captured.err
    assert (workdir / "out" / "benchmark" / "results.md").is_file()
    assert not list((workdir / "out" / "benchmark").glob("roc_*.png"))


def test_ctrl_c_is_one_line_and_exit_130(workdir, capsys, monkeypatch):
    from reb_dist import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_fit", interrupted)
    assert main(["fit", "--no-mlflow", "--categories", "bottle"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: reb fit" in err and "Traceback" not in err


SIGTERM_DURING_FIT = """
import os, signal, sys, time
from reb_dist import cli

def fit(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)

cli.cmd_fit = fit
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a process normally starts, whatever started the tests
sys.exit(cli.main(["fit", "--no-mlflow", "--categories", "bottle"]))
"""


def test_sigterm_is_one_line_and_exit_143_in_any_command(tmp_path):
    # `ray job stop` and `kill` send SIGTERM: Python's default ended the process at once (exit -15, no
    # word, its MLflow run left RUNNING until the next run found its process gone)
    import subprocess

    done = subprocess.run([sys.executable, "-c", SIGTERM_DURING_FIT], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "interrupted: reb fit" in done.stderr and "(SIGTERM)" in done.stderr and "Traceback" not in done.stderr


def test_every_subcommand_has_a_description_and_every_flag_a_help_text():
    import argparse

    from reb_dist.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert parser.description and len(parser.description) > 20, name
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"reb {name} {action.option_strings or action.dest}"
    tune = sub.choices["tune"].format_help()
    assert "tune.trials" in tune and "selection.json" in tune  # what it searches and what it writes


def test_packaged_configs_are_listed_printed_and_taken_by_name_outside_a_checkout(tmp_path, monkeypatch, capsys):
    from reb_dist.config import PACKAGED_CONFIGS
    from reb_dist.distributed.sweep import Sweep

    monkeypatch.chdir(tmp_path)  # no jobs/ or tune/ here: only the installed package's files
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("sample_benchmark", "sample_sweep", "k_alpha"))
    assert main(["configs", "sample_sweep"]) == 0
    assert capsys.readouterr().out == (PACKAGED_CONFIGS / "sample_sweep.yaml").read_text()
    assert main(["benchmark", "--config", "sample_benchmark", "--print-config"]) == 0
    assert "root: sample" in capsys.readouterr().out
    assert len(Sweep.load("sample_sweep.yaml").cells) == 2
    assert main(["tune", "--config", "k_alpa", "--print-config"]) == 2
    assert "k_alpa: config file not found (packaged ones, usable by name: k_alpha" in capsys.readouterr().err
