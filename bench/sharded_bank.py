"""Bank density build and query throughput: single-process faiss vs N Ray shard actors, the exact
kNN's GFLOP/s against this machine's float32 GEMM rate, and the approximate density paths' recall.

Everything is measured in one run on one machine, on real EfficientNet-Lite0 patch features (a
seeded random subset of a category's training bank; test patches as queries). Prints figures and
the command that made them. Example:

    .venv/bin/python bench/sharded_bank.py --root ../shared/data/mvtec_ad --category bottle
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from common import bench_parser, print_command

from reb_dist.config import RunConfig
from reb_dist.distributed.runtime import ensure_ray
from reb_dist.distributed.sharded_bank import ShardedBank
from reb_dist.pipelines.evaluate import fit_detector, load_category, loader
from reb_dist.core.ldknn import BankIndex
from reb_dist.core.ldknn.approx import recall_at_k


def features(args) -> tuple[np.ndarray, np.ndarray]:
    """(bank, queries) float32 patch features, cached as .npz so that reruns skip the CNN."""
    cache = Path(args.cache) / f"{args.category}-lite0-features.npz"
    if cache.is_file():
        f = np.load(cache)
        return f["bank"], f["queries"]
    cfg = RunConfig.load(None, [f"data.root={args.root}", "tracking.enabled=false", *args.overrides])
    split = load_category(cfg.data, args.category)
    detector = fit_detector(cfg, split)
    test = detector.extract(loader(split.test, cfg.data), desc="test features")
    bank, queries = detector.bank, test.reshape(-1, test.shape[-1])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, bank=bank, queries=queries)
    return bank, queries


def gemm_gflops(m: int, n: int, k: int, repeat: int = 3) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        torch.mm(a, b)
    return 2 * m * n * k * repeat / (time.perf_counter() - t) / 1e9


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = bench_parser(__doc__.split("\n")[0])
    p.add_argument("--bank-size", type=int, default=100_000, help="bank points used (random subset)")
    p.add_argument("--queries", type=int, default=20_000, help="test patches used for query throughput")
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--shards", default="1,2", help="shard counts to compare with single-process faiss")
    p.add_argument("--approximate", default="ivf,hnsw")
    p.add_argument("--recall-points", type=int, default=0,
                   help="also measure the approximate paths on the WHOLE bank, for this many random bank "
                        "points (exact whole-bank density would be O(n^2); a sample keeps it affordable)")
    p.add_argument("--skip-subset", action="store_true", help="only the --recall-points section")
    p.add_argument("--nprobe", default="16", help="IVF lists visited per query, comma-separated to compare")
    p.add_argument("--cache", default="outputs/bench_cache")
    args = p.parse_args()
    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    faiss.omp_set_num_threads(cpus)

    bank_all, queries_all = features(args)
    rng = np.random.default_rng(0)
    bank = bank_all[np.sort(rng.choice(len(bank_all), min(args.bank_size, len(bank_all)), replace=False))]
    queries = queries_all[rng.choice(len(queries_all), min(args.queries, len(queries_all)), replace=False)]
    n, d = bank.shape
    everything = np.arange(n)
    density_flop = 2.0 * n * n * d  # the distance GEMM of a whole-bank self-search
    query_flop = 2.0 * len(queries) * n * d
    rows: list[tuple[str, str]] = []

    def row(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name:<58} {value}", flush=True)

    print_command()
    if args.recall_points:
        whole_bank_recall(bank_all, args, row)
    if args.skip_subset:
        return
    print(f"{args.category}: bank {n} x {d} (of {len(bank_all)}), {len(queries)} queries, K={args.k}, "
          f"{cpus} CPUs, faiss {faiss.__version__}, torch {torch.__version__}")
    row("float32 GEMM, torch, 4096 x 4096 x 4096", f"{gemm_gflops(4096, 4096, 4096):.1f} GFLOP/s")
    row(f"float32 GEMM, torch, kNN shape 4096 x 16384 x {d}", f"{gemm_gflops(4096, 16384, d, 10):.1f} GFLOP/s")

    # single process, exact: faiss's BLAS path (its database block size decides the GEMM shape)
    single = BankIndex(bank)
    default_bs = faiss.cvar.distance_compute_blas_database_bs
    exact = None
    for bs in (default_bs, 16384):
        faiss.cvar.distance_compute_blas_database_bs = bs
        (dist, ids), s = timed(lambda: single.search_bank_points(everything, args.k))
        exact = exact or (dist, ids)
        row(f"single process: whole-bank density (faiss db block {bs})",
            f"{s:7.1f} s  {density_flop / s / 1e9:6.1f} GFLOP/s")
    faiss.cvar.distance_compute_blas_database_bs = default_bs
    exact_density = exact[0].mean(axis=1)
    _, s = timed(lambda: single.search(queries, args.k))
    row("single process: test-patch queries (K nearest)",
        f"{len(queries) / s:7.0f} queries/s  {query_flop / s / 1e9:6.1f} GFLOP/s")

    half = BankIndex(bank, dtype="float16")
    (hd, _), s = timed(lambda: half.search_bank_points(everything, args.k))
    rel = np.abs(hd.mean(1) - exact_density) / exact_density
    row("single process, float16 bank: whole-bank density",
        f"{s:7.1f} s  (density rel. change median {np.median(rel):.1e}, max {rel.max():.1e})")

    ensure_ray()  # once, so that each ShardedBank's start-up below is its actors', not Ray's
    with tempfile.TemporaryDirectory(prefix="reb-bench-shards-") as tmp:
        for num in [int(x) for x in args.shards.split(",") if x]:
            (sharded, s_open) = timed(lambda: ShardedBank.create(
                bank, Path(tmp) / str(num), num, cpus_per_shard=max(0.5, cpus / num)))
            with sharded:
                (sd, si), s = timed(lambda: sharded.search_bank_points(everything, args.k))
                same = (si == exact[1]).mean()
                err = np.abs(sd - exact[0]).max()
                row(f"{num} Ray shard(s): whole-bank density",
                    f"{s:7.1f} s  {density_flop / s / 1e9:6.1f} GFLOP/s  (ids equal {100 * same:.3f}%, "
                    f"max |diff| {err:.1e}; start-up {s_open:.1f} s)")
                _, s = timed(lambda: sharded.search(queries, args.k))
                row(f"{num} Ray shard(s): test-patch queries",
                    f"{len(queries) / s:7.0f} queries/s  {query_flop / s / 1e9:6.1f} GFLOP/s")

    for name, s_build, s, found in approximate_runs(bank, everything, exact, args):
        row(f"{name}: whole-bank density (build {s_build:.1f} s)",
            f"{s:7.1f} s  speed-up {timed_single(rows) / s:4.1f}x  {found}")


def approximate_variants(args) -> list[tuple[str, int]]:
    """(kind, nprobe) pairs to measure: every --nprobe for IVF, one run for HNSW (nprobe unused)."""
    return [(kind, int(nprobe)) for kind in args.approximate.split(",") if kind
            for nprobe in (args.nprobe.split(",") if kind == "ivf" else ["0"])]


def approximate_runs(bank: np.ndarray, points: np.ndarray, exact: tuple[np.ndarray, np.ndarray], args):
    """(name, build s, search s, recall text) of every approximate variant asked for, on `points`."""
    for kind, nprobe in approximate_variants(args):
        yield (variant_name(kind, nprobe), *measure_approximate(bank, points, exact, kind, nprobe, args.k))


def variant_name(kind: str, nprobe: int) -> str:
    return f"{kind} nprobe={nprobe}" if kind == "ivf" else kind


def measure_approximate(bank: np.ndarray, points: np.ndarray, exact: tuple[np.ndarray, np.ndarray], kind: str,
                        nprobe: int, k: int) -> tuple[float, float, str]:
    """(index build s, search s, recall and density-error text) of one approximate path for `points`,
    against the exact (distances, ids) of the same points."""
    approx = BankIndex(bank, neighbour_search=kind, nprobe=nprobe)
    (_, s_build) = timed(lambda: approx.approximate_index(kind))
    (found_d, found_i), s = timed(lambda: approx.search_bank_points(points, k))
    exact_density = exact[0].mean(axis=1)
    rel = (found_d.mean(1) - exact_density) / exact_density
    return s_build, s, (f"recall@{k} {recall_at_k(exact[1], found_i):.4f}  density rel. error median "
                        f"{np.median(rel):.1e}, p99 {np.quantile(rel, 0.99):.1e}, max {rel.max():.1e}")


def whole_bank_recall(bank: np.ndarray, args, row) -> None:
    """Recall and density error of the approximate paths at the category's full bank size (where the
    defaults by bank size matter), on a random sample of bank points; whole-bank times extrapolated."""
    n = len(bank)
    sample = np.sort(np.random.default_rng(1).choice(n, min(args.recall_points, n), replace=False))
    scale = n / len(sample)
    print(f"{args.category}: whole bank {n} x {bank.shape[1]}, {len(sample)} sampled bank points, K={args.k}")
    exact, s = timed(lambda: BankIndex(bank).search_bank_points(sample, args.k))
    row(f"whole bank, exact: {len(sample)} points",
        f"{s:7.1f} s  (whole bank ~{s * scale / 60:.0f} min)")
    for name, s_build, s, found in approximate_runs(bank, sample, exact, args):
        row(f"whole bank, {name}: {len(sample)} points (build {s_build:.0f} s)",
            f"{s:7.1f} s  (whole bank ~{(s_build + s * scale) / 60:.0f} min)  {found}")


def timed_single(rows: list[tuple[str, str]]) -> float:
    """The fastest single-process exact whole-bank density time printed above."""
    return min(float(v.split()[0]) for k, v in rows if k.startswith("single process: whole-bank density"))


if __name__ == "__main__":
    main()
