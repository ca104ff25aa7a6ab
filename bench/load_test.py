"""Load test: concurrent `reb evaluate` processes on one new MLflow store, and a sharded bank whose
actors are killed at random during evaluation. Not a timed test: it prints what happened.

1. Fit one model (the category's training images) and evaluate it once alone: the reference.
2. Rounds of N `reb evaluate` processes started at once, all logging to one MLflow sqlite store that
   does not exist yet, each into its own output folder.
3. `reb evaluate` on a 2-shard bank (Ray actors) repeated for --seconds, while a killer SIGKILLs a
   random shard actor every --kill-every seconds.
Then: runs completed, runs failed (and whether with a one-line error rather than a traceback),
whether every completed run's metrics equal the reference exactly, and the store's integrity (every
run finished, `reb report` reads it).

    .venv/bin/python bench/load_test.py --processes 4 --rounds 2 --seconds 120 --kill-every 7
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import bench_parser, print_command

REB = [sys.executable, "-m", "reb_dist.cli"]


def reb(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*REB, *args], cwd=cwd, capture_output=True, text=True)


def metrics_of(folder: Path) -> dict:
    rows = json.loads((folder / "evaluate" / "results.json").read_text())["results"]
    return {(r["category"], r["method"]): r["metrics"] for r in rows}


def outcome(proc: subprocess.CompletedProcess, folder: Path, reference: dict) -> dict:
    ok = proc.returncode == 0
    err = proc.stderr.strip().splitlines()
    return {"ok": ok, "traceback": "Traceback" in proc.stderr, "error": "" if ok else (err[-1] if err else "?"),
            "identical": ok and metrics_of(folder) == reference}


def shard_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::BankShard"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def killer(stop: threading.Event, every: float, kills: list[int]) -> None:
    rng = random.Random(0)
    while not stop.wait(every):
        pids = shard_pids()
        if pids:
            pid = rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
            except ProcessLookupError:
                pass


def main() -> None:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=120.0, help="how long the sharded part runs")
    p.add_argument("--kill-every", type=float, default=7.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reb-load-"))
    store = f"sqlite:///{work / 'mlflow.db'}"
    data = ["--root", args.root, "--categories", args.category, "--set", "backbone.device=cpu",
            *[a for o in args.overrides for a in ("--set", o)]]
    model = work / "model.safetensors"
    fitted = reb(["fit", *data, "-o", str(model), "--no-mlflow"], work)
    if fitted.returncode:
        sys.exit(f"fit failed:\n{fitted.stderr}")
    clean = reb(["evaluate", *data, "-m", str(model), "--no-mlflow", "--set", "output_dir=clean"], work)
    if clean.returncode:
        sys.exit(f"clean evaluate failed:\n{clean.stderr}")
    reference = metrics_of(work / "clean")

    results = []
    for r in range(args.rounds):
        procs = []
        for i in range(args.processes):
            out = work / f"concurrent-{r}-{i}"
            cmd = [*REB, "evaluate", *data, "-m", str(model), "--set", f"tracking.uri={store}",
                   "--set", f"output_dir={out}"]
            procs.append((subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                          out))
        for proc, out in procs:
            stdout, stderr = proc.communicate()
            results.append(("concurrent", outcome(subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                                                              stderr), out, reference)))

    stop, kills = threading.Event(), []
    thread = threading.Thread(target=killer, args=(stop, args.kill_every, kills), daemon=True)
    thread.start()
    start, n = time.monotonic(), 0
    while time.monotonic() - start < args.seconds:
        out = work / f"sharded-{n}"
        proc = reb(["evaluate", *data, "-m", str(model), "--set", "bank.shards=2", "--set", f"tracking.uri={store}",
                    "--set", f"output_dir={out}"], work)
        results.append(("sharded, actors killed", outcome(proc, out, reference)))
        n += 1
    stop.set()
    thread.join()

    print_command()
    print(f"work folder: {work}; shard actors killed: {len(kills)}")
    print("| part | runs | completed | identical to the clean run | failed, one-line error | failed with a traceback |")
    print("|---|---:|---:|---:|---:|---:|")
    for part in dict.fromkeys(name for name, _ in results):
        rows = [o for name, o in results if name == part]
        print(f"| {part} | {len(rows)} | {sum(o['ok'] for o in rows)} | {sum(o['identical'] for o in rows)} | "
              f"{sum(not o['ok'] and not o['traceback'] for o in rows)} | {sum(o['traceback'] for o in rows)} |")
    for name, o in results:
        if not o["ok"]:
            print(f"- {name}: {o['error']}")

    import mlflow

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    statuses = {}
    for run in runs:
        statuses[run.info.status] = statuses.get(run.info.status, 0) + 1
    report = reb(["report", "--tracking-uri", store, "-o", str(work / "report")], work)
    said = (report.stderr.strip().splitlines() or [""])[-1]
    print(f"store: {len(runs)} runs, statuses {statuses}; reb report exit code {report.returncode} {said}")


if __name__ == "__main__":
    main()
