"""Which MLflow store a command writes to: MLflow's precedence (explicit setting, else
MLFLOW_TRACKING_URI, else ./mlflow.db), on real sqlite stores."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from reb_dist.cli import main
from reb_dist.config import RunConfig
from reb_dist.io.tracking import DEFAULT_URI, Tracker, resolve_uri


def here(name: str) -> str:
    """A sqlite URI of `name` in the current folder, as resolve_uri makes relative files absolute."""
    return f"sqlite:///{Path(name).absolute()}"


def test_resolve_uri_explicit_then_environment_then_local_default(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_URI == "sqlite:///mlflow.db" and resolve_uri(None) == here("mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_uri(None) == resolve_uri("") == here("env.db")
    assert resolve_uri("sqlite:///explicit.db") == here("explicit.db")
    assert resolve_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db" and resolve_uri("http://h:5000") == "http://h:5000"
    assert RunConfig.load().tracking.uri is None  # the default means "not set", so the environment counts


def test_the_default_store_is_the_current_folders_in_each_command(tmp_path, monkeypatch):
    """MLflow caches stores by URI: with a relative sqlite URI, a script's second command run from
    another folder logged into the first folder's mlflow.db."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RunConfig.load()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        with Tracker(cfg.tracking).run(cfg, "test"):
            pass
    for name in ("a", "b"):
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        assert len(client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id])) == 1, name


def test_benchmark_and_report_follow_mlflow_tracking_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    rc = main(["benchmark", "--categories", "bottle", "--methods", "knn", "--set", "data.few_shot=4", "--set", "output_dir=out",
               "--set", "tracking.heatmap_examples=0", "--set", "cache.enabled=false",
               "--set", "scoring.pixel_metrics=false"])
    assert rc == 0
    assert not (tmp_path / "mlflow.db").exists()
    client = mlflow.MlflowClient(other)
    runs = client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id])
    parent = [r for r in runs if r.data.tags.get("command") == "benchmark"]
    assert len(parent) == 1 and parent[0].data.params["tracking.uri"] == other  # the store used, logged
    assert {r.data.tags.get("method") for r in runs if r.data.tags.get("category") == "bottle"} == {"knn(k=9)"}

    # `reb report` without --tracking-uri reads the same store
    capsys.readouterr()
    assert main(["report", "-o", "report"]) == 0
    assert "knn(k=9)" in (tmp_path / "report" / "report.md").read_text()
    assert not (tmp_path / "mlflow.db").exists()


def test_an_explicit_uri_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    explicit = RunConfig.load(None, ["tracking.uri=sqlite:///explicit.db"]).tracking
    assert Tracker(explicit).uri == here("explicit.db")
    assert Tracker(RunConfig.load().tracking).uri == here("env.db")


def test_a_run_with_an_explicit_store_does_not_become_the_next_runs_default(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into the environment: a later command in the
    same process (or a job it submits) must still get its own default, not the previous run's store."""
    from reb_dist.config import RunConfig
    from reb_dist.io.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RunConfig.load(None, [f"tracking.uri=sqlite:///{tmp_path / 'explicit.db'}"])
    with Tracker(cfg.tracking).run(cfg, "test"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert resolve_uri(None) == here("mlflow.db")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")  # the user's own setting survives
    with Tracker(cfg.tracking).run(cfg, "test"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///env.db"
