"""`ray job submit` entry point: run (or resume) a sweep on the cluster the job was submitted to.

    ray job submit --address http://127.0.0.1:8265 -- python "$PWD/jobs/sweep.py" \
        --sweep "$PWD/jobs/sample_sweep.yaml" --out "$PWD/outputs/sweeps/sample"

The same as `reb sweep` (same flags; --sweep is --config), for a cluster whose jobs run a script
rather than the installed `reb`. Resubmitting the same command after an interruption skips the
cells already done.
"""

from __future__ import annotations

import sys

from reb_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["sweep", *sys.argv[1:]]))
