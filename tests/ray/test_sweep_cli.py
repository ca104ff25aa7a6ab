"""`reb sweep` through the CLI on the session's local Ray: a two-cell sweep of the shipped bottles,
its cell files, summary and MLflow runs; run again, it skips both cells."""

from __future__ import annotations

import csv
import json

import mlflow

from reb_dist.cli import main

SWEEP = """
name: clitest
base: {backbone: {device: cpu}, data: {check_files: false, image_size: 128}, scoring: {pixel_metrics: false}}
grid:
  datasets:
    - {name: shot4, root: sample, categories: [bottle], set: [data.few_shot=4]}
    - {name: shot2, root: sample, categories: [bottle], set: [data.few_shot=2]}
  methods: [ldknn, knn]
"""
CELLS = ["shot4-bottle-efficientnet_lite0", "shot2-bottle-efficientnet_lite0"]
METHODS = {"ldknn(k=9,alpha=1)", "knn(k=9)"}


def test_reb_sweep_runs_every_cell_writes_the_summary_and_resumes(local_ray, tmp_path, capsys):
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0
    assert "2 cells, 0 done before, 2 to run" in capsys.readouterr().err

    for cell in CELLS:
        result = json.loads((out / "cells" / f"{cell}.json").read_text())
        assert set(result["methods"]) == METHODS and result["bank_size"] > 0
    bank = {c: json.loads((out / "cells" / f"{c}.json").read_text())["bank_size"] for c in CELLS}
    assert bank[CELLS[0]] == 2 * bank[CELLS[1]]  # each cell ran with its own few_shot
    with open(out / "summary.csv", newline="") as fh:  # method specs hold commas: quoted, read back whole
        rows = list(csv.DictReader(fh))
    assert {(r["dataset"], r["method"]) for r in rows} == {(d, m) for d in ("shot4", "shot2") for m in METHODS}
    assert all(0.0 <= float(r["image_auroc"]) <= 1.0 for r in rows)

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("reb-dist-sweeps").experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("kind") == "sweep"] == ["FINISHED"]
    cells = [r for r in runs if r.data.tags.get("kind") == "cell"]
    assert len(cells) == len(CELLS) * len(METHODS)
    for r in cells:  # named as benchmark result runs are: filtered and compared by backbone and preset alike
        assert r.data.params["backbone.name"] == r.data.tags["backbone"] == "efficientnet_lite0"
        assert r.data.params["preset"] == r.data.tags["preset"] and "scoring.k" in r.data.params

    # again: both cells are done, nothing runs, the summary stays
    assert main(["-q", "sweep", "--sweep", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0
    assert "done before" not in capsys.readouterr().err  # -q: no info line
    assert (out / "done.log").read_text().split() == CELLS
