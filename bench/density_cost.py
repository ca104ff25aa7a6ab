"""What LDKNN's bank density costs: the whole bank vs only the bank points test patches land next to.

Prints figures and the command that made them. Example:
    .venv/bin/python bench/density_cost.py --root /work/shared/data/mvtec_ad --category bottle
"""

from __future__ import annotations

import time

import numpy as np
from common import bench_parser, print_command

from reb_dist.config import RunConfig
from reb_dist.pipelines.evaluate import fit_detector, load_category, loader
from reb_dist.core.ldknn import BankStats


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--k", type=int, default=9)
    args = p.parse_args()
    cfg = RunConfig.load(None, [f"data.root={args.root}", f"scoring.k={args.k}", *args.overrides])
    split = load_category(cfg.data, args.category)
    detector = fit_detector(cfg, split)
    batches = loader(split.test, cfg.data)
    test = detector.extract(batches, total=len(batches), desc="test features")
    queries = test.reshape(-1, test.shape[-1])
    index = detector.scorer.index

    t = time.perf_counter()
    _, ids = index.search(queries, 1, progress="test search")
    search_s = time.perf_counter() - t
    needed = np.unique(ids[:, 0])

    t = time.perf_counter()
    lazy = BankStats(index).local_density(args.k, True, ids[:, 0], progress="density (needed)")
    lazy_s = time.perf_counter() - t
    t = time.perf_counter()
    full = BankStats(index).local_density(args.k, True, progress="density (all)")
    full_s = time.perf_counter() - t
    rel = np.abs(lazy - full[ids[:, 0]]) / np.abs(full[ids[:, 0]]).clip(1e-12)
    assert rel.max() < 1e-3, rel.max()  # equal up to faiss's tie-breaking among near-equal neighbours

    print_command()
    print(f"{args.category}: bank {len(index)} x {index.bank.shape[1]}, {len(queries)} test patches, K={args.k}")
    print(f"test search (1-NN)          {search_s:8.1f} s")
    print(f"density, whole bank         {full_s:8.1f} s  ({len(index)} points)")
    print(f"density, needed points only {lazy_s:8.1f} s  ({len(needed)} points, "
          f"{100 * len(needed) / len(index):.0f}% of the bank; max relative difference {rel.max():.1e})")


if __name__ == "__main__":
    main()
