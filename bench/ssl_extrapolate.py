"""Where a CPU fine-tuning run's SSL accuracy is heading: a log-linear fit extrapolated to the paper's schedule.

With no GPU to run the paper's 300 steps x 1,008 images, this reads a short run's per-step metrics
(a run folder's metrics.jsonl, or learning_curve.json), averages the SSL accuracy over windows of
steps, fits accuracy = a + b * ln(images seen) to the windows after the frozen warm-up (all classes
and each class), and prints the fitted accuracy at the target number of images, capped at 1, with the
CPU time the run's own images/s would take to get there. A straight line in ln(images) is what early
learning curves commonly follow; it says nothing about a plateau the short run has not reached, so
read the figure as "if the trend held", not as a prediction.

    python bench/ssl_extrapolate.py outputs/finetune/pill/learning_curve.json --freeze-steps 4
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

PAPER_IMAGES = 300 * 1008  # the paper's schedule: 300 steps x 1,008 images


def read_steps(path: Path) -> list[dict]:
    """Per-step records from a metrics.jsonl (one JSON object a line) or a learning_curve.json."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if "ssl" not in data:
        raise SystemExit(f"{path}: no 'ssl' list (is it a learning_curve.json?)")
    return data["ssl"]


def log_linear_fit(images: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(a, b) of values = a + b * ln(images), least squares."""
    b, a = np.polyfit(np.log(images), values, 1)
    return float(a), float(b)


def windows(steps: list[dict], key: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean images seen, mean value) over consecutive windows of `size` steps holding `key`."""
    rows = [s for s in steps if key in s]
    chunks = [rows[i:i + size] for i in range(0, len(rows) - size + 1, size)]
    return (np.array([np.mean([r["images_seen"] for r in c]) for c in chunks]),
            np.array([np.mean([r[key] for r in c]) for c in chunks]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", type=Path, help="metrics.jsonl or learning_curve.json of a fine-tuning run")
    p.add_argument("--freeze-steps", type=int, default=4, help="warm-up steps left out of the fit")
    p.add_argument("--window", type=int, default=5, help="steps averaged per fitted point")
    p.add_argument("--target-images", type=int, default=PAPER_IMAGES)
    p.add_argument("--workers", type=int, default=1, help="training workers of the run (its images/s is per worker)")
    args = p.parse_args(argv)
    print("# python bench/ssl_extrapolate.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))

    steps = [s for s in read_steps(args.metrics) if int(s["step"]) > args.freeze_steps]
    if len(steps) < 2 * args.window:
        raise SystemExit(f"{args.metrics}: {len(steps)} steps after the warm-up; need at least {2 * args.window}")
    seen = steps[-1]["images_seen"]
    rate = np.median([s["images_per_second_worker"] for s in steps]) * args.workers
    keys = ["accuracy"] + sorted({k for s in steps for k in s if k.startswith("accuracy/")})
    print(f"{len(steps)} steps after the warm-up, {seen:,} images seen; fit in windows of {args.window} steps; "
          f"extrapolated to {args.target_images:,} images ({args.target_images / seen:.0f}x further)")
    print(f"| SSL accuracy | last window | slope per e-fold of images | at {args.target_images:,} images (if the trend held) |")
    print("|---|---:|---:|---:|")
    for key in keys:
        x, y = windows(steps, key, args.window)
        a, b = log_linear_fit(x, y)
        at_target = min(1.0, max(0.0, a + b * np.log(args.target_images)))
        name = "all classes" if key == "accuracy" else key.removeprefix("accuracy/")
        print(f"| {name} | {y[-1]:.2f} | {b:+.3f} | {at_target:.2f} |")
    hours = args.target_images / rate / 3600
    print(f"throughput of this run: {rate:.1f} images/s (median step) -> {args.target_images:,} images would take "
          f"{hours:.1f} h on its CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
