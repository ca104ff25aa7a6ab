"""Every result row says which search mode computed it (exact, faithful, coreset-densities) and, when
a search was approximate, its recall against exact; `reb report` keeps rows of different modes apart
instead of letting the newest run of a class replace the others (issue 24)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace

import mlflow
import pytest
from mlflow.entities import Metric, Param

from reb_dist.commands.benchmark import benchmark
from reb_dist.config import RunConfig
from reb_dist.io.tracking import Tracker, collect_results, legacy_mode
from reb_dist.reporting.report import write_report
from reb_dist.reporting.results import write_results
from reb_dist.reporting.tables import CORESET_NOTE
from tests.unit.io.test_store_safety import fake_result

METHOD = "ldknn(k=9,alpha=1)"


def read_csv(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text(), newline="")))


def test_the_report_keeps_an_exact_and_a_coreset_run_of_one_class_as_two_labelled_rows(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = {"exact": {"image_auroc": 0.9},  # first: before, the newest (coreset) run replaced it
              "coreset-densities": {"image_auroc": 0.8, "query_recall": 0.97, "density_recall": 0.95}}
    for mode, metrics in logged.items():
        cfg = RunConfig.load(None, [f"tracking.uri={uri}", f"preset={mode}"])
        with Tracker(cfg.tracking).run(cfg, "benchmark") as tracker:
            tracker.log_result("bottle", METHOD, metrics, {"weights": "imagenet"}, mode=mode)

    rows, _ = collect_results(uri)
    assert [(r["category"], r["method"], r["mode"], r["image_auroc"]) for r in rows] == [
        ("bottle", METHOD, "coreset-densities", 0.8), ("bottle", METHOD, "exact", 0.9)]
    assert (rows[0]["query_recall"], rows[0]["density_recall"]) == (0.97, 0.95)
    assert "query_recall" not in rows[1] and "density_recall" not in rows[1]

    write_report(rows, [], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.splitlines()[0] == ("| category | backbone | weights | method | mode | image_auroc | pixel_auroc | aupro "
                                  "| query_recall | density_recall |")
    assert f"| bottle | efficientnet_lite0 | imagenet | {METHOD} | coreset-densities | 80.0 | - | - | 97.0 | 95.0 |" \
        in md
    assert f"| bottle | efficientnet_lite0 | imagenet | {METHOD} | exact | 90.0 | - | - | - | - |" in md
    assert md.count(CORESET_NOTE) == 1
    back = read_csv(tmp_path / "report" / "report.csv")
    assert [(r["mode"], r["image_auroc"], r["query_recall"], r["density_recall"]) for r in back] == [
        ("coreset-densities", "0.800000", "0.970000", "0.950000"), ("exact", "0.900000", "", "")]


def test_runs_logged_before_modes_keep_apart_by_the_preset_their_parent_run_logged(tmp_path):
    """Written as the older code wrote a benchmark: the settings (preset, bank.*) and the backbone tag
    on the parent run only, the result run with k, alpha and weights."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("reb-dist")
    for preset, auroc in (("exact", 0.9), ("fast", 0.8)):
        parent = client.create_run(experiment, tags={"command": "benchmark", "backbone": "efficientnet_lite0",
                                                     "preset": preset})
        ratio = "0.1" if preset == "fast" else "1.0"
        client.log_batch(parent.info.run_id, params=[Param("preset", preset), Param("bank.coreset_ratio", ratio)])
        child = client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id, "category": "bottle",
                                                    "method": METHOD})
        client.log_batch(child.info.run_id, metrics=[Metric("image_auroc", auroc, 0, 0)],
                         params=[Param("k", "9"), Param("alpha", "1.0"), Param("weights", "imagenet")])
        for run in (child, parent):
            client.set_terminated(run.info.run_id, "FINISHED")

    rows, _ = collect_results(uri)
    assert len(rows) == 2, rows  # before, the newer (coreset) run replaced the exact one
    assert [(r["backbone"], r["mode"], r["image_auroc"]) for r in rows] == [
        ("efficientnet_lite0", "coreset-densities", 0.8), ("efficientnet_lite0", "exact", 0.9)]


@pytest.mark.parametrize("params, mode", [
    ({}, "exact"),  # before presets
    ({"preset": "exact"}, "exact"),
    ({"preset": "fast"}, "coreset-densities"),
    ({"preset": "exact", "bank.coreset_ratio": "0.25"}, "coreset-densities"),  # a coreset set by hand
    ({"preset": "exact", "bank.coreset_ratio": "1.0", "bank.query_search": "ivf"}, "faithful"),
    ({"preset": "exact", "bank.query_search": "auto", "bank.neighbour_search": "auto"}, "exact"),
])
def test_the_mode_of_an_older_run_is_read_from_its_settings(params, mode):
    assert legacy_mode(params) == mode


def test_an_approximate_benchmark_labels_every_row_file_and_run_with_its_mode_and_recall(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RunConfig.load(None, [f"{k}={v}" for k, v in {
        "data.categories": "[bottle]", "backbone.device": "cpu", "tracking.uri": uri, "tracking.heatmap_examples": "0",
        "scoring.methods": "[ldknn,knn]", "bank.query_search": "ivf", "bank.neighbour_search": "ivf",
        "bank.nprobe": "1", "output_dir": str(tmp_path / "out")}.items()])
    benchmark(cfg, "reb benchmark (test)")
    printed = capsys.readouterr().out
    assert "mode" in printed and "faithful" in printed and "density_recall" in printed

    out = tmp_path / "out" / "benchmark"
    written = json.loads((out / "results.json").read_text())["results"]
    assert {r["method"] for r in written} == {METHOD, "knn(k=9)"} and {r["mode"] for r in written} == {"faithful"}
    for r in written:  # one search of each kind per run: every method's row has the same recalls
        assert 0 < r["metrics"]["query_recall"] < 1 and r["metrics"]["query_recall_k"] == 9.0
        assert 0 < r["metrics"]["density_recall"] <= 1 and r["metrics"]["density_recall_k"] == 9.0
    md = (out / "results.md").read_text()
    header = md.splitlines()[0]
    assert header.startswith("| category | method | mode |") and header.endswith("| query_recall | density_recall |")
    assert f"| bottle | {METHOD} | faithful |" in md and CORESET_NOTE not in md
    assert "Preset: auto (mode: faithful)" in md

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id])
    children = [r for r in runs if r.data.tags.get("category") == "bottle"]
    assert len(children) == 2
    assert all(r.data.tags["mode"] == r.data.params["mode"] == "faithful" for r in children)
    assert all("query_recall" in r.data.metrics and "density_recall" in r.data.metrics for r in children)
    rows, _ = collect_results(uri)
    assert {(r["method"], r["mode"]) for r in rows} == {(METHOD, "faithful"), ("knn(k=9)", "faithful")}
    assert all(0 < r["density_recall"] <= 1 for r in rows)


def test_a_coreset_densities_table_says_its_densities_are_not_the_whole_banks(tmp_path, capsys):
    cfg = RunConfig.load(None, ["tracking.enabled=false", "preset=coreset-densities"])
    result = replace(fake_result(0), search_mode="coreset-densities")
    result.methods[0].metrics.update(query_recall=0.98, query_recall_k=9.0)
    rows = write_results([result], tmp_path / "benchmark", Tracker(cfg.tracking), "reb benchmark", cfg, "benchmark")
    assert rows[0]["mode"] == "coreset-densities" and rows[0]["query_recall"] == 0.98
    assert capsys.readouterr().out.count(CORESET_NOTE) == 1
    md = (tmp_path / "benchmark" / "results.md").read_text()
    assert md.count(CORESET_NOTE) == 1 and "| bottle | knn(k=9) | coreset-densities |" in md
    (entry,) = json.loads((tmp_path / "benchmark" / "results.json").read_text())["results"]
    assert entry["mode"] == "coreset-densities" and entry["metrics"]["query_recall"] == 0.98
