"""`ray job submit` of a sweep to a real local Ray cluster started by the test: stopped part way,
resubmitted, every cell done exactly once, every MLflow run closed."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    """A head node of our own (`ray start --block`, stopped by SIGTERM: `ray stop` would also stop
    the Ray every other test shares). Token auth on, as Ray 2.60 requires for the job CLI. Every
    port is a free one: the session's shared Ray already holds the fixed defaults (its dashboard
    agent sits on 52365), and a second agent that cannot bind leaves the job API with no agent."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    env["RAY_TMPDIR"] = temp  # the same folder for the CLI, and where agent_log() looks
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={free_port()}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:  # until the job API answers (asked in this process: each `ray job` CLI call costs ~2 s)
            try:
                client = api(address, env)
                client.list_jobs()
                break
            except Exception as error:  # not up yet: connection refused, or no job agent yet
                assert head.poll() is None and time.time() < deadline, f"the Ray head did not come up: {error}"
                time.sleep(0.5)
        yield address, env, client
    finally:
        head.terminate()
        head.wait(60)
        shutil.rmtree(temp, ignore_errors=True)


def api(address, env):
    """The job API's Python client, with the head's token: for status and logs, which the test only reads."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers={"authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})


CLI_TIMEOUT = 120  # s for one `ray job` command: a hang fails the test with the agent's log, not at 600 s


def agent_log(env) -> str:
    """The tail of the head's dashboard agent log: it says why the job API has no agent."""
    logs = sorted(Path(env["RAY_TMPDIR"]).glob("session_*/logs/dashboard_agent.log"))
    return f"--- {logs[-1]}:\n{logs[-1].read_text()[-3000:]}" if logs else "no dashboard_agent.log"


def job(address, env, command, *args, timeout=CLI_TIMEOUT) -> str:
    for _ in range(60):  # the dashboard answers before its job agent is up: retry that case only
        try:
            out = subprocess.run(["ray", "job", command, "--address", address, *args], env=env,
                                 capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise AssertionError(f"`ray job {command}` hung for {timeout} s\n{agent_log(env)}") from error
        if "No available agent" not in out.stderr + out.stdout:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stderr[-2000:] + "\n" + agent_log(env)
    return out.stdout + out.stderr


def wait_status(client, job_id, wanted, timeout=600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in wanted:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {wanted} after {timeout} s:\n{client.get_job_logs(job_id)[-3000:]}")


def test_sweep_job_is_stopped_resubmitted_and_runs_every_cell_once(cluster, tmp_path):
    address, env, client = cluster
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("""
name: jobtest
max_concurrent: 1
base: {backbone: {device: cpu}, data: {check_files: false}, scoring: {pixel_metrics: false}, cache: {enabled: false}}
grid:
  datasets:
    - {name: full, root: sample, categories: [bottle]}
    - {name: shot8, root: sample, categories: [bottle], set: [data.few_shot=8]}
    - {name: shot4, root: sample, categories: [bottle], set: [data.few_shot=4]}
  methods: [ldknn, knn]
""")
    out = tmp_path / "out"
    entry = ["--", sys.executable, str(REPO / "jobs" / "sweep.py"), "--sweep", str(sweep), "--out", str(out)]
    first = job(address, env, "submit", "--no-wait", "--submission-id", "sweep-1", *entry)
    assert "sweep-1" in first

    done_log = out / "done.log"
    deadline = time.time() + 600
    while not (done_log.is_file() and done_log.read_text().strip()):
        assert time.time() < deadline, client.get_job_logs("sweep-1")[-3000:]
        time.sleep(0.5)
    job(address, env, "stop", "sweep-1")
    assert wait_status(client, "sweep-1", ["STOPPED", "SUCCEEDED", "FAILED"]) == "STOPPED"
    after_stop = done_log.read_text().split()
    assert 1 <= len(after_stop) < 3, "the stop must land part way for this test to mean anything"

    job(address, env, "submit", "--submission-id", "sweep-2", *entry, timeout=600)  # blocks until it ends
    assert wait_status(client, "sweep-2", ["SUCCEEDED", "FAILED", "STOPPED"]) == "SUCCEEDED"
    logs = client.get_job_logs("sweep-2")
    assert f"{len(after_stop)} done before" in logs

    cells = ["full-bottle-efficientnet_lite0", "shot8-bottle-efficientnet_lite0", "shot4-bottle-efficientnet_lite0"]
    assert sorted(done_log.read_text().split()) == sorted(cells)  # each exactly once, over both jobs
    for cell in cells:
        result = json.loads((out / "cells" / f"{cell}.json").read_text())
        assert set(result["methods"]) == {"ldknn(k=9,alpha=1)", "knn(k=9)"}
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 3 * 2

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("reb-dist-sweeps").experiment_id])
    parents = sorted((r for r in runs if r.data.tags.get("kind") == "sweep"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in parents] == ["FAILED", "FINISHED"]  # stopped, then completed
    cell_runs = [r for r in runs if r.data.tags.get("kind") == "cell"]
    assert all(r.info.status == "FINISHED" for r in cell_runs)
    assert len(cell_runs) == 3 * 2  # one per (cell, method): none logged twice
