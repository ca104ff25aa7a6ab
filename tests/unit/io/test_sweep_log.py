"""A sweep's MLflow bookkeeping survives a stop between logging a cell and writing its file."""

import os
import signal

import mlflow
import pytest

from reb_dist.commands.sweep import _DeferredStop
from reb_dist.io.tracking import SweepLog
from reb_dist.errors import Terminated


def cell_runs(uri):
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    return sorted((r.data.tags["cell"], r.data.tags["method"]) for r in runs if r.data.tags.get("kind") == "cell")


def test_a_cell_logged_by_a_stopped_submission_is_not_logged_again(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    methods = {"knn(k=9)": {"image_auroc": 0.9}, "ldknn(k=9,alpha=1)": {"image_auroc": 0.95}}
    first = SweepLog(uri, "sweeps", "s", {}, str(tmp_path))
    first.log_cell("c1", {"category": "bottle"}, {"bank_size": 10}, methods)
    # stopped here: c1's file was never written, so the next submission reruns c1 and logs it again
    second = SweepLog(uri, "sweeps", "s", {}, str(tmp_path))
    second.log_cell("c1", {"category": "bottle"}, {"bank_size": 10}, methods)
    second.log_cell("c2", {"category": "bottle"}, {"bank_size": 10}, {"knn(k=9)": {"image_auroc": 0.8}})
    assert cell_runs(uri) == [("c1", "knn(k=9)"), ("c1", "ldknn(k=9,alpha=1)"), ("c2", "knn(k=9)")]


def test_a_sigterm_inside_a_cells_bookkeeping_stops_the_sweep_only_after_it():
    stop = _DeferredStop()
    previous = signal.signal(signal.SIGTERM, stop.handle)
    steps = []
    try:
        with pytest.raises(Terminated, match="SIGTERM"):
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("file written")
                steps.append("done.log written")
        assert steps == ["file written", "done.log written"]
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)  # outside a cell's bookkeeping: at once
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_cell_run_takes_every_setting_however_many(tmp_path):
    """A cell run carries the cell's resolved settings (about 100 params), logged in batches of at most
    100, the most an MLflow tracking server takes in one call (a sqlite store takes more: this test
    guards the batching's bookkeeping, it does not reproduce a server's refusal)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {f"section.key{i}": i for i in range(150)}
    SweepLog(uri, "sweeps", "s", {}, str(tmp_path)).log_cell("c1", {"category": "bottle"}, params,
                                                             {"knn(k=9)": {"image_auroc": 0.9}})
    client = mlflow.MlflowClient(uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
              if r.data.tags.get("kind") == "cell"]
    assert run.data.params == {**{k: str(v) for k, v in params.items()}, "method": "knn(k=9)"}


def test_a_sweeps_artefacts_live_beside_its_store_not_in_the_current_folder(tmp_path, monkeypatch):
    """MLflow's default artefact root is ./mlruns of the process's folder: a sweep run from one folder
    into a store in another put sweep.yaml in the first. A sqlite store now keeps them beside it."""
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    sweep = SweepLog(uri, "my sweeps", "s", {"cells": 2}, str(tmp_path))
    sweep.close("FINISHED")
    artefacts = sorted(p.relative_to(store) for p in store.rglob("sweep.yaml"))
    assert len(artefacts) == 1 and artefacts[0].parts[:2] == ("mlartifacts", "my_sweeps")
    assert not any(elsewhere.iterdir()), sorted(elsewhere.rglob("*"))


def test_a_second_sweep_into_a_folder_a_sweep_is_running_into_is_refused(tmp_path):
    # two `reb sweep` into one folder at once both ran every cell (done.log listed each twice), and the
    # second marked the first's MLflow run FAILED while it ran
    from reb_dist.commands.sweep import run_sweep
    from reb_dist.config import config_file
    from reb_dist.distributed.sweep import Sweep
    from reb_dist.errors import RebError
    from tests.lock_holder import lock_held_elsewhere

    out = tmp_path / "out"
    out.mkdir()
    with lock_held_elsewhere(out / ".sweep.lock"):
        with pytest.raises(RebError, match=r"another sweep is running into this folder now.*--out"):
            run_sweep(Sweep.load(config_file("sample_sweep")), out)
        assert not (out / "mlflow.db").exists() and not (out / "done.log").exists()  # refused before any work
