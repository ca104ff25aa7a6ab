"""Exact search, pruned against brute force, on one category's whole bank: test patches and the
density build's self-search, with the answers compared.

The bank is the category's training features (ONNX Runtime, whole bank: the exact preset's). Brute
force is faiss's flat index (what every exact search ran before pruning); pruned is
`reb_dist.core.ldknn.pruned.PrunedExactSearch` (its k-means built once, timed apart). Test patches are
searched in batches of --batch images, as `reb predict` searches them; the self-search is the density
build's (K + 1 nearest of each bank point, self dropped) on --self-points seeded bank points (0: all).

Prints a markdown table and the command that made it. Example:
    .venv/bin/python bench/exact_search.py --root ../shared/data/mvtec_ad --category pill
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import bench_parser, print_command

from reb_dist.config import RunConfig
from reb_dist.pipelines.evaluate import extract_samples, fit_detector, load_category


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="test images whose patches are searched")
    p.add_argument("--batch", type=int, default=16, help="images per search call, as predict's batch")
    p.add_argument("--k", type=int, default=0, help="K of the self-search (0: the configured scoring.k)")
    p.add_argument("--self-points", type=int, default=0, help="bank points self-searched (0: every one)")
    args = p.parse_args()
    print_command()
    cfg = RunConfig.load(None, [f"data.root={args.root}", "preset=exact", "tracking.enabled=false",
                                "cache.enabled=false", "backbone.device=cpu", *args.overrides])
    split = load_category(cfg.data, args.category)
    detector = fit_detector(cfg, split)
    index = detector.index
    test = extract_samples(detector, split.test[:args.images], cfg.data)[0]
    per_image = test.shape[1] * test.shape[2]
    queries = np.ascontiguousarray(test.reshape(-1, test.shape[-1]))
    k = args.k or cfg.scoring.k
    n = len(index)
    points = np.arange(n) if not args.self_points else \
        np.sort(np.random.default_rng(0).choice(n, min(args.self_points, n), replace=False))

    index.use_pruning(True)
    build_s, _ = timed(index.pruned_search)
    rows = []
    for name in ("brute force (faiss flat)", "pruned"):
        index.use_pruning(name == "pruned")
        search_s, (dist, ids) = timed(lambda: index.search(queries, 1, batch_size=args.batch * per_image))
        visited = index.pruned_search().visited if index.prunes else 1.0
        self_s, (self_dist, self_ids) = timed(lambda: index.search_bank_points(points, k, progress="self-search"))
        rows.append((name, search_s, visited, self_s, dist, ids, self_dist, self_ids))
        print(f"{name}: test patches {search_s:.1f} s, self-search {self_s:.1f} s", flush=True)
    (_, flat_s, _, flat_self, d0, i0, sd0, si0), (_, pruned_s, visited, pruned_self, d1, i1, sd1, si1) = rows
    print(f"\n{args.category}: bank of {n} points x {index.dim} dims; {args.images} test images "
          f"({len(queries)} patches, nearest bank point, batches of {args.batch} images); self-search "
          f"K={k} of {len(points)} bank points; {torch.get_num_threads()} threads; k-means lists: "
          f"{index.pruned_search().nlist}, built in {build_s:.1f} s\n")
    print("| search | test patches s | s per image | self-search s | share of bank visited (test) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| brute force (faiss flat) | {flat_s:.1f} | {flat_s / args.images:.3f} | {flat_self:.1f} | 100% |")
    print(f"| pruned | {pruned_s:.1f} | {pruned_s / args.images:.3f} | {pruned_self:.1f} | {100 * visited:.1f}% |")
    print(f"| pruned speed-up | {flat_s / pruned_s:.1f}x | | {flat_self / pruned_self:.1f}x | |")
    print(f"\nsame nearest bank point: {np.mean(i0 == i1):.6f} of test patches (largest distance difference "
          f"{np.abs(d0 - d1).max():.1e}); same K nearest: {np.mean(si0 == si1):.6f} of self-search neighbours "
          f"(largest difference {np.abs(sd0 - sd1).max():.1e})")
    detector.close()


if __name__ == "__main__":
    main()
