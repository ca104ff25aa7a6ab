"""Stores shared by processes: the MLflow store, a results folder, any folder written atomically.

Each test runs real processes (the venv's Python), started together or killed with SIGKILL, as users
do with two `reb benchmark`s in one folder or a Ctrl-\\ / OOM kill.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from reb_dist.config import RunConfig
from reb_dist.io.atomic import write_atomic, write_text_atomic
from reb_dist.io.tracking import Tracker, collect_results

REPO = Path(__file__).resolve().parents[3]
# a child waits for the file `go` (so all start at once), after writing `ready-<n>` (imports done)
CHILD_PRELUDE = """
import sys, time
from pathlib import Path
sync, n = Path(sys.argv[1]), sys.argv[2]
def wait_for_go():
    (sync / f"ready-{n}").touch()
    while not (sync / "go").exists():
        time.sleep(0.01)
"""


def spawn(code: str, sync: Path, n: int, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), str(sync), str(n)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, dead[0].stdout.read()
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.02)


def start_together(code: str, n: int, sync: Path, cwd: Path) -> list[subprocess.Popen]:
    """`n` children running `code`, released at once when all have imported what they need."""
    sync.mkdir(exist_ok=True)
    procs = [spawn(code, sync, i, cwd) for i in range(n)]
    for i in range(n):
        wait_for(sync / f"ready-{i}", procs)
    (sync / "go").touch()
    return procs


# 1. a new sqlite store, first used by several processes at once

TRACKED_RUN = """
from reb_dist.config import RunConfig
from reb_dist.io.tracking import Tracker
cfg = RunConfig.load(None, ["tracking.uri=sqlite:///mlflow.db"])
wait_for_go()
with Tracker(cfg.tracking).run(cfg, "benchmark", run_name=f"run-{n}") as tracker:
    tracker.log_metrics({"x": float(n)})
"""


def test_processes_creating_a_new_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    procs = start_together(TRACKED_RUN, 3, tmp_path / "sync", tmp_path)  # the default store, in the cwd
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("reb-dist").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        (f"run-{i}", "FINISHED") for i in range(3)]


@pytest.fixture(scope="module")
def new_store(tmp_path_factory) -> Path:
    """A new, complete store, made once by another process (this one caches opened stores): each test
    damages its own copy of it (a process importing MLflow and migrating a store costs seconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    uri = f"sqlite:///{path}"
    subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({uri!r}).search_experiments()"],
                   check=True, capture_output=True)
    return path


def _store(template: Path, path: Path) -> str:
    """A copy of the new, complete store `template` at `path`."""
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.mark.parametrize("damage, says", [
    # what two concurrent migrations left: an older schema version and alembic's temporary table
    ("UPDATE alembic_version SET version_num = 'c8d9e0f1a2b3';"
     "CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)",
     ["half-migrated", "_alembic_tmp_experiments", "mv "]),
    ("UPDATE alembic_version SET version_num = 'c8d9e0f1a2b3'", ["mlflow db upgrade"]),  # an older MLflow's store
])
def test_a_broken_store_is_a_clear_error_not_a_traceback(tmp_path: Path, damage: str, says: list[str],
                                                         new_store: Path) -> None:
    uri = _store(new_store, tmp_path / "mlflow.db")
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        con.executescript(damage)
    done = subprocess.run([str(Path(sys.executable).with_name("reb")), "report", "--tracking-uri", uri,
                           "-o", str(tmp_path / "report")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert str(tmp_path / "mlflow.db") in done.stderr and all(s in done.stderr for s in says), done.stderr


# 2. a run killed by SIGKILL

KILLED_RUN = """
import os
from reb_dist.config import RunConfig
from reb_dist.io.tracking import Tracker
cfg = RunConfig.load(None, [f"tracking.uri=sqlite:///{sync.parent / 'mlflow.db'}"])
with Tracker(cfg.tracking).run(cfg, "benchmark", run_name=f"killed-{n}") as tracker:
    with tracker.child("bottle", {"category": "bottle"}):
        (sync / f"ready-{n}").touch()
        time.sleep(600)
"""


def _kill_during_a_run(tmp_path: Path, n: int) -> int:
    sync = tmp_path / "sync"
    sync.mkdir(exist_ok=True)
    proc = spawn(KILLED_RUN, sync, n, tmp_path)
    wait_for(sync / f"ready-{n}", [proc])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def _statuses(uri: str, prefix: str) -> dict[str, str]:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.info.run_name: r.info.status for r in runs
            if r.info.run_name.startswith(prefix) or r.data.tags.get("mlflow.parentRunId") in
            {p.info.run_id for p in runs if p.info.run_name.startswith(prefix)}}


def test_runs_of_a_killed_process_are_marked_failed_by_the_next_run_and_by_report(tmp_path: Path, caplog) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pid = _kill_during_a_run(tmp_path, 0)
    assert _statuses(uri, "killed-0") == {"killed-0": "RUNNING", "bottle": "RUNNING"}
    cfg = RunConfig.load(None, [f"tracking.uri={uri}"])
    with Tracker(cfg.tracking).run(cfg, "benchmark", run_name="next") as tracker:
        run_id = tracker.run_id
        assert _statuses(uri, "killed-0") == {"killed-0": "FAILED", "bottle": "FAILED"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warned if "FAILED" in w]) == 1 and str(pid) in "".join(warned), warned
    caplog.clear()
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["reb.pid"] == str(os.getpid())
    assert run.data.tags["reb.host"]

    _kill_during_a_run(tmp_path, 1)
    collect_results(uri)  # `reb report` reads the store
    assert _statuses(uri, "killed-1") == {"killed-1": "FAILED", "bottle": "FAILED"}
    assert any("FAILED" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_live_runs_process_is_left_running(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RunConfig.load(None, [f"tracking.uri={uri}"])
    with Tracker(cfg.tracking).run(cfg, "benchmark", run_name="outer"):
        collect_results(uri)
        assert _statuses(uri, "outer") == {"outer": "RUNNING"}



def test_runs_opened_under_a_child_run_that_is_cut_off_are_marked_failed(tmp_path: Path) -> None:
    # Ray Tune's MLflow callback opens a run per trial under the class's run; Ctrl-C in the search left
    # the trial that was running RUNNING for ever
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RunConfig.load(None, [f"tracking.uri={uri}"])
    client = mlflow.MlflowClient(uri)
    with pytest.raises(KeyboardInterrupt):
        with Tracker(cfg.tracking).run(cfg, "tune", run_name="outer") as tracker:
            with tracker.child("bottle/tune", {"kind": "class"}) as class_run:
                experiment = client.get_run(class_run).info.experiment_id
                done = client.create_run(experiment, tags={"mlflow.parentRunId": class_run}, run_name="trial-done")
                client.set_terminated(done.info.run_id, "FINISHED")
                client.create_run(experiment, tags={"mlflow.parentRunId": class_run}, run_name="trial-cut")
                elsewhere = client.create_run(experiment, run_name="another-run")  # not under it: left alone
                raise KeyboardInterrupt
    assert _statuses(uri, "outer") == {"outer": "FAILED", "bottle/tune": "FAILED"}
    trials = {r.info.run_name: r.info.status for r in client.search_runs([experiment])
              if r.data.tags.get("mlflow.parentRunId") == class_run}
    assert trials == {"trial-done": "FINISHED", "trial-cut": "FAILED"}
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"


# 3. two runs writing results into one folder

WRITE_RESULTS = """
from reb_dist.config import RunConfig
from reb_dist.io.tracking import Tracker
from reb_dist.reporting.results import write_results
from tests.unit.io.test_store_safety import fake_result
cfg = RunConfig.load(None, ["tracking.enabled=false"])
wait_for_go()
write_results([fake_result(int(n))], sync.parent / "out" / "benchmark", Tracker(cfg.tracking),
              f"reb benchmark run-{n}", cfg, "benchmark")
"""


def fake_result(n: int):
    """A one-method result whose image AUROC tells the run apart (no images, no gallery)."""
    from reb_dist.core.ldknn.scorers import ScoringMethod
    from reb_dist.results import CategoryResult, MethodResult

    labels = np.array([0, 0, 1, 1])
    method = MethodResult(ScoringMethod("knn"), {"image_auroc": 0.5 + n / 10}, np.array([0.1, 0.2, 0.3, 0.4]))
    return CategoryResult("bottle", None, labels, ["good"] * 2 + ["broken"] * 2, [method],
                          {"total": 1.0}, bank_size=10, feature_dim=4)


def test_concurrent_runs_into_one_output_folder_each_keep_their_results(tmp_path: Path) -> None:
    procs = start_together(WRITE_RESULTS, 2, tmp_path / "sync", REPO)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    out = tmp_path / "out" / "benchmark"
    kept = {}
    for path in out.rglob("results.json"):
        payload = json.loads(path.read_text())
        kept.setdefault(payload["command"], []).append(path)
        md = (path.parent / "results.md").read_text()  # each folder's table and JSON are one run's
        assert payload["command"] in md and (path.parent / "config.yaml").is_file()
    assert set(kept) == {"reb benchmark run-0", "reb benchmark run-1"}
    # the latest run stays where readers look for it, its own copy beside it
    latest = json.loads((out / "results.json").read_text())
    assert (out / latest["run"] / "results.json").read_text() == (out / "results.json").read_text()
    assert (out / "roc_bottle.png").is_file() and (out / latest["run"] / "roc_bottle.png").is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# 4. a writer killed during an atomic write

SLOW_WRITER = """
import os
from reb_dist.io.atomic import write_atomic
def write(tmp):
    # as safetensors does: its own hidden temporary beside the path it is given, filled, then renamed
    Path(tmp).with_name(f".tmpAbC12{n}").write_bytes(b"x" * 1_000_000)
    Path(tmp).write_bytes(b"")
    (sync / f"tmp-{n}").write_text(tmp)
    (sync / f"ready-{n}").touch()
    time.sleep(600)
write_atomic(sync.parent / "models" / "bottle.safetensors", write)
"""


def test_a_killed_writers_temporaries_are_removed_by_the_next_write_a_live_ones_kept(tmp_path: Path) -> None:
    sync = tmp_path / "sync"
    sync.mkdir()
    killed, live = spawn(SLOW_WRITER, sync, 0, tmp_path), spawn(SLOW_WRITER, sync, 1, tmp_path)
    try:
        wait_for(sync / "ready-0", [killed, live])
        wait_for(sync / "ready-1", [killed, live])
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        models = tmp_path / "models"
        dead_tmp, live_tmp = Path((sync / "tmp-0").read_text()), Path((sync / "tmp-1").read_text())
        left = set(models.iterdir())
        dead_own, live_own = dead_tmp.with_name(".tmpAbC120"), live_tmp.with_name(".tmpAbC121")
        assert dead_tmp.exists() and dead_own.exists()

        write_text_atomic(models / "other.txt", "x")
        assert not dead_tmp.exists() and not dead_own.exists()
        assert live_tmp.exists() and live_own.exists()  # a live writer's: untouched
        assert set(models.iterdir()) == left - {dead_tmp, dead_own, dead_tmp.parent} | {models / "other.txt"}
    finally:
        for proc in (killed, live):
            proc.kill()
            proc.wait()


def test_another_hosts_temporaries_are_removed_only_when_stale(tmp_path: Path) -> None:
    # the module's temporary name: .<target>.<host hash>.<pid>.<random>.tmp, a folder
    stale, fresh = tmp_path / ".a.png.0123abcd.77.89abcdef.tmp", tmp_path / ".b.png.0123abcd.78.89abcdef.tmp"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "x").write_bytes(b"half")
    old = time.time() - 3600
    os.utime(stale / "x", (old, old))
    os.utime(stale, (old, old))
    (tmp_path / ".tmpzzzzzz").write_bytes(b"not ours")  # never touched: nothing says who wrote it
    write_text_atomic(tmp_path / "c.txt", "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.png.0123abcd.78.89abcdef.tmp", ".tmpzzzzzz", "c.txt"]


def test_files_written_by_a_library_with_its_own_0600_temporary_are_0644(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "m.safetensors", lambda tmp: save_file({"a": np.zeros(3)}, tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_store_that_cannot_be_opened_fails_within_seconds_naming_its_uri(tmp_path: Path) -> None:
    import socket
    import time

    from reb_dist.io.tracking import TrackingStoreError, open_store

    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    with pytest.raises(TrackingStoreError, match=re.escape(f"{uri}: cannot create the store's folder")):
        open_store(uri)  # was: FileNotFoundError on the lock file, a traceback
    made = f"sqlite:///{tmp_path / 'new' / 'folder' / 'mlflow.db'}"
    assert open_store(made, "e")[1] is not None  # a missing folder is made

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(TrackingStoreError, match=f"http://127.0.0.1:{port}: the MLflow server cannot be reached"):
        open_store(f"http://127.0.0.1:{port}", "e")  # MLflow alone retried for 4 min 21 s
    assert time.perf_counter() - start < 10
