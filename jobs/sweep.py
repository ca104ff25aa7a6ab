"""`ray job submit` entry point: run (or resume) a sweep on the cluster the job was submitted to.

    ray job submit --address http://127.0.0.1:8265 -- python "$PWD/jobs/sweep.py" \
        --sweep "$PWD/jobs/sample_sweep.yaml" --out "$PWD/outputs/sweeps/sample"

Resubmitting the same command after an interruption skips the cells already done.
"""

from __future__ import annotations

import argparse
import sys

from reb_dist.errors import RebError
from reb_dist.distributed.sweep import Sweep, run_sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", required=True, help="sweep YAML (see jobs/sample_sweep.yaml)")
    p.add_argument("--out", required=True, help="folder for cell results, summary and (by default) MLflow")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///<out>/mlflow.db)")
    p.add_argument("--experiment", default="reb-dist-sweeps")
    args = p.parse_args(argv)
    try:
        results = run_sweep(Sweep.load(args.sweep), args.out, args.tracking_uri, args.experiment)
    except RebError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(results)} cells done; summary in {args.out}/summary.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
