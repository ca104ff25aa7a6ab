"""The README's main job: `reb benchmark --config jobs/sample_benchmark.yaml` on the shipped bottle and
pill subsets prints the table and ends with a sentence naming who led, consistent with the table."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow

from reb_dist.cli import main
from reb_dist.config import RunConfig

JOB = Path(__file__).resolve().parents[2] / "jobs" / "sample_benchmark.yaml"


def test_the_main_job_benchmarks_bottle_and_pill_and_ends_with_who_led(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # at 128 px the job costs a sixth of its 256-px CPU time; the data, methods and steps are the job's
    assert main(["benchmark", "--config", str(JOB), "--set", f"tracking.uri={uri}", "--set", "data.image_size=128",
                 "--set", f"output_dir={tmp_path / 'out'}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    out = tmp_path / "out" / "benchmark"

    # every configured method has finite metrics on pill, as results.json and the printed table say
    methods = RunConfig.load(JOB).scoring.methods
    results = json.loads((out / "results.json").read_text())["results"]
    pill = {r["method"]: r["metrics"] for r in results if r["category"] == "pill"}
    assert len(pill) == len(methods) and {r["category"] for r in results} == {"bottle", "pill"}
    for method, metrics in pill.items():
        for name in ("image_auroc", "pixel_auroc", "aupro", "image_f1"):
            assert math.isfinite(metrics[name]) and 0 <= metrics[name] <= 1, (method, name, metrics[name])
        row = next(line.split() for line in lines if line.split()[:2] == ["pill", method])
        assert row[2] == "exact"  # the sample's banks are small: the default preset searches them exactly
        assert float(row[3]) == round(100 * metrics["image_auroc"], 1)
    assert len({m["image_auroc"] for m in pill.values()}) > 1  # the methods differ on pill

    # the last line is the sentence, and the method it names as pill's leader has pill's best image AUROC
    sentence = lines[-1]
    assert sentence.startswith("By image AUROC, ") and sentence.endswith(".")
    shown = {m: round(100 * v["image_auroc"], 1) for m, v in pill.items()}
    best = max(shown.values())
    clause = re.search(r"on pill (.+?) (?:led with|tied for the lead at|tied at) ([\d.]+)", sentence)
    assert clause and float(clause[2]) == best, sentence
    named = {m for m in shown if m in clause[1]}
    assert named == {m for m, v in shown.items() if v == best}, sentence
    if len(named) == 1:
        runner_up = max(v for v in shown.values() if v < best)
        assert f"{best - runner_up:.1f} points ahead" in sentence

    # the heatmap galleries: a bottle one, a pill one and one with both classes' defects side by side
    assert {"heatmaps_bottle.png", "heatmaps_pill.png", "heatmaps_classes.png", "roc_pill.png"} <= {
        p.name for p in out.iterdir()}
    from PIL import Image

    with Image.open(out / "heatmaps_classes.png") as both, Image.open(out / "heatmaps_pill.png") as pill_only:
        assert both.size[0] == pill_only.size[0]  # 4 cells a row: 2 bottle defects then 2 pill defects
    client = mlflow.MlflowClient(uri)
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id])
                  if r.data.tags.get("command") == "benchmark")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/heatmaps_pill.png", "plots/heatmaps_classes.png"} <= logged
