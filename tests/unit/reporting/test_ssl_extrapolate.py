"""bench/ssl_extrapolate.py: a short run's SSL accuracy, fitted in ln(images) and carried to a target."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "ssl_extrapolate.py"


def _run(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, args)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return done.value.code, capsys.readouterr().out


def test_a_log_linear_curve_is_carried_to_the_target_and_capped_at_one(tmp_path, capsys, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    rows = []
    for step in range(1, 41):
        seen = 100 * step
        rows.append({"step": step, "images_seen": seen, "images_per_second_worker": 5.0,
                     "accuracy": 0.02 * math.log(seen), "accuracy/normal": 0.1 + 0.2 * math.log(seen)})
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out = _run(capsys, monkeypatch, metrics, "--freeze-steps", 0, "--window", 1, "--target-images", 10_000,
                     "--workers", 2)
    assert code == 0
    assert f"| all classes | {0.02 * math.log(4000):.2f} | +0.020 | {0.02 * math.log(10_000):.2f} |" in out
    assert "| normal | " in out and out.split("| normal | ")[1].split("\n")[0].endswith("| +0.200 | 1.00 |")
    assert "10.0 images/s" in out and f"{10_000 / 10 / 3600:.1f} h" in out


def test_too_short_a_run_is_refused_with_its_file_named(tmp_path, capsys, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 5, "images_seen": 10, "images_per_second_worker": 1.0,
                                   "accuracy": 0.2}) + "\n")
    code, _ = _run(capsys, monkeypatch, metrics)
    assert "metrics.jsonl: 1 steps after the warm-up" in str(code)
