"""How far sharded IVF bank densities are from the single-index IVF ones, and both from exact.

Above 1M bank points `bank.neighbour_search=auto` is IVF; a sharded bank then trains one IVF index
per shard (about 4 sqrt(n/N) lists each) where the single index trains one (about 4 sqrt(n)), so the
candidates differ. Both re-rank exactly, so no density is below the exact one. This measures the
difference on a real bank, forcing IVF at a size that fits here: LDKNN densities (mean distance to
the K nearest other bank points, squared L2) of a seeded sample of bank points. Prints the figures and
the command. Example:

    .venv/bin/python bench/sharded_ivf.py --root ../shared/data/mvtec_ad --category bottle --shards 2,4
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from common import bench_parser, print_command

from reb_dist.config import RunConfig
from reb_dist.core.ldknn import BankIndex
from reb_dist.distributed.runtime import ensure_ray
from reb_dist.distributed.sharded_bank import ShardedBank
from reb_dist.pipelines.evaluate import fit_detector, load_category


def densities(index, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist2, ids = index.search_bank_points(points, k)
    return dist2.mean(axis=1), ids


def compare(name: str, got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], ref_name: str) -> None:
    rel = (got[0] - ref[0]) / ref[0]
    same = np.mean([set(a) == set(b) for a, b in zip(got[1], ref[1])])
    print(f"| {name} vs {ref_name} | {np.median(np.abs(rel)):.2e} | {np.abs(rel).max():.2e} | {rel.min():+.2e} | "
          f"{100 * same:.2f}% |")


def main() -> None:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--shards", default="2,4")
    p.add_argument("--sample", type=int, default=20000)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--nprobe", default="0", help="IVF lists visited per query, comma-separated; 0: 1/48 of the lists")
    args = p.parse_args()
    cfg = RunConfig.load(None, [f"data.root={args.root}", f"data.categories=[{args.category}]", "backbone.device=cpu",
                                "tracking.enabled=false", *args.overrides])
    detector = fit_detector(cfg, load_category(cfg.data, args.category))
    bank = detector.bank
    points = np.sort(np.random.default_rng(0).choice(len(bank), min(args.sample, len(bank)), replace=False))
    exact = densities(BankIndex(bank, neighbour_search="exact"), points, args.k)
    print_command()
    print(f"bank {bank.shape[0]:,} x {bank.shape[1]}, {len(points):,} sampled bank points, K = {args.k}")
    print("| densities | median abs. rel. difference | max abs. rel. difference | min signed | same K neighbours |")
    print("|---|---:|---:|---:|---:|")
    ensure_ray()
    for nprobe in [int(x) for x in args.nprobe.split(",")]:
        tag = f"nprobe {nprobe or '1/48 of the lists'}"
        single = densities(BankIndex(bank, neighbour_search="ivf", nprobe=nprobe), points, args.k)
        compare(f"single-index IVF, {tag}", single, exact, "exact")
        with tempfile.TemporaryDirectory(prefix="reb-bench-ivf-") as tmp:
            for num in [int(x) for x in args.shards.split(",") if x]:
                with ShardedBank.create(bank, Path(tmp) / str(num), num, neighbour_search="ivf", nprobe=nprobe,
                                        cpus_per_shard=max(0.5, 2 / num)) as sharded:
                    got = densities(sharded, points, args.k)
                compare(f"{num}-shard IVF, {tag}", got, exact, "exact")
                compare(f"{num}-shard IVF, {tag}", got, single, "single-index IVF")


if __name__ == "__main__":
    main()
