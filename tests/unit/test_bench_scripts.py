"""The benchmark scripts stay runnable: every one imports against the library as it is now (a
reorganisation once left bench/gpu_check.py importing a function that no longer existed, unnoticed
because only a GPU session runs it), and the GPU check, which a lent GPU machine runs once with little time to
spare, runs through on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")

IMPORT_ALL = """
import runpy, sys
failed = []
for path in sys.argv[1:]:
    try:
        runpy.run_path(path, run_name="imported")  # module level only: main() is behind __name__ == "__main__"
    except BaseException as exc:
        failed.append(f"{path}: {exc!r}")
print("\\n".join(failed) or "all imported")
"""


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=timeout)


def test_every_benchmark_script_imports():
    assert len(SCRIPTS) >= 15
    done = run(["-c", IMPORT_ALL, *map(str, SCRIPTS)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "all imported", done.stdout[-3000:]


def test_the_gpu_check_runs_on_cpu_with_a_reduced_precision_beside_float32():
    done = run(["gpu_check.py", "--device", "cpu", "--precisions", "fp32,bf16", "--max-train", "4",
                "--max-test", "6", "--image-size", "64"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "[cpu fp32] bank" in out and "[cpu bf16] bank" in out
    assert "[cpu bf16 vs cpu fp32] test features: max |diff|" in out
    assert out.count("image AUROC       knn") == 2
    assert "faiss / Ray / MLflow imported: none" in out
