"""Coreset methods on a category's bank: seconds and coverage radius per ratio and method.

The coverage radius (largest distance from a bank point to its nearest kept point, full feature
space) is the k-center objective the greedy methods minimise: lower is better. Prints figures, line
by line, and the command that made them. Example (the plain greedy takes about an hour per 10%):
    .venv/bin/python bench/coreset.py --root /work/shared/data/mvtec_ad --category bottle \\
        --ratios 0.1 --methods fast,greedy
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from common import bench_parser, print_command

from reb_dist.config import RunConfig
from reb_dist.core.ldknn import CORESET_METHODS, coverage_radius, select_coreset
from reb_dist.pipelines.evaluate import fit_detector, load_category


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--ratios", default="0.25,0.1,0.01", help="comma-separated coreset ratios")
    p.add_argument("--methods", default=",".join(CORESET_METHODS), help="comma-separated: fast,greedy,random")
    args = p.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = sorted(args.methods.split(","), key=lambda m: m != "greedy")  # greedy first: the reference
    cfg = RunConfig.load(None, [f"data.root={args.root}", *args.overrides, "bank.coreset_ratio=1"])
    detector = fit_detector(cfg, load_category(cfg.data, args.category))
    bank = detector.bank
    detector.close()
    b = cfg.bank
    for method in methods:  # warm-up: thread pools and BLAS start outside the timings
        select_coreset(bank[:2000], 0.1, method, b.coreset_projection_dim, b.seed)

    print_command()
    print(f"{args.category}: bank {bank.shape[0]} x {bank.shape[1]}, projection {b.coreset_projection_dim}, "
          f"seed {b.seed}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'ratio':>6} {'method':>7} {'points':>7} {'seconds':>9} {'radius':>8}  vs greedy")
    for ratio in ratios:
        done = {}
        for method in methods:
            start = time.perf_counter()
            ids = select_coreset(bank, ratio, method, b.coreset_projection_dim, b.seed, progress=True)
            seconds = time.perf_counter() - start
            radius = coverage_radius(bank, ids)
            done[method] = ids, seconds, radius
            note = ""
            if method != "greedy" and "greedy" in done:
                g_ids, g_seconds, g_radius = done["greedy"]
                note = (f"{g_seconds / seconds:.1f}x faster, radius x{radius / g_radius:.4f}, "
                        f"{100 * len(np.intersect1d(ids, g_ids)) / len(g_ids):.1f}% same points")
            print(f"{ratio:6.2f} {method:>7} {len(ids):7d} {seconds:9.1f} {radius:8.3f}  {note}", flush=True)


if __name__ == "__main__":
    main()
