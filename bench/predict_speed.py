"""End-to-end inference speed of `reb predict`'s loop (read, preprocess, features, search, scores,
pixel maps; no files written) per search mode and feature engine, on one category's test images.

For each preset a model is fitted once (its bank and the densities it stores), then `predict` scores
the same --images test images with each engine: torch eager (how reb-dist ran before feature
engines), torch channels_last and ONNX Runtime, after a warm-up batch (the engine built, the IVF
calibrated). A model whose test patches are searched exactly is timed with each --exact-searches:
pruned (the default search) and flat (faiss's brute force, how exact searches ran before pruning).
The best of --repeat passes is reported, with the image scores' largest relative difference from the
first row's, and the share of the time spent in features.

Prints a markdown table and the command that made it. Example:
    .venv/bin/python bench/predict_speed.py --root ../shared/data/mvtec_ad --category pill \
        --presets exact,faithful,coreset-densities
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import bench_parser, print_command

from reb_dist.config import RunConfig
from reb_dist.core.feature_engines import TorchEngine
from reb_dist.pipelines.evaluate import fit_detector, load_category
from reb_dist.pipelines.predict import predict

ENGINES = ("torch eager", "torch", "onnxruntime")


def use_engine(detector, name: str) -> None:
    """Make `detector` extract features with engine `name` from now on."""
    detector.engine_name = "torch" if name.startswith("torch") else name
    detector._engine = None
    if name == "torch eager":
        detector._engine = TorchEngine(detector.features, torch.device("cpu"), channels_last=False)
    detector.feature_engine  # built now, not in the timed passes


def timed_predict(detector, paths, batch: int, repeat: int) -> tuple[float, float, np.ndarray]:
    """Best images/s of `predict` over `repeat` passes, the features' share of that pass, and its scores."""
    predict(detector, paths[:batch], batch)  # warm-up
    best, share, scores = float("inf"), 0.0, None
    for _ in range(repeat):
        before = detector.timings.seconds.get("features", 0.0)
        start = time.perf_counter()
        preds = predict(detector, paths, batch)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, share = elapsed, (detector.timings.seconds["features"] - before) / elapsed
            scores = np.array([p.score for p in preds])
    return len(paths) / best, share, scores


def main() -> None:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--presets", default="exact,faithful,coreset-densities")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--exact-searches", default="pruned,flat")
    args = p.parse_args()
    print_command()
    rows = []
    for preset in filter(None, args.presets.split(",")):
        cfg = RunConfig.load(None, [f"data.root={args.root}", f"preset={preset}", "tracking.enabled=false",
                                    "cache.enabled=false", "backbone.device=cpu", *args.overrides])
        split = load_category(cfg.data, args.category)
        start = time.perf_counter()
        detector = fit_detector(cfg, split)
        detector.compute_density()
        fit_s = time.perf_counter() - start
        paths = [s.image_path for s in split.test][:args.images]
        reference = None
        exact = detector.index.query_search == "exact"
        for search in filter(None, args.exact_searches.split(",")) if exact else [""]:
            if exact:
                detector.index.use_pruning(search == "pruned")
            for engine in filter(None, args.engines.split(",")):
                use_engine(detector, engine)
                rate, share, scores = timed_predict(detector, paths, args.batch, args.repeat)
                reference = scores if reference is None else reference
                diff = float(np.max(np.abs(scores - reference) / np.maximum(np.abs(reference), 1e-12)))
                mode = f"{detector.search_mode} ({search})" if exact else detector.search_mode
                rows.append((preset, mode, engine, fit_s, rate, share, diff))
                print(f"{preset} / {mode} / {engine}: {rate:.1f} images/s", flush=True)
        detector.close()
    print(f"\n{args.category}: predict over {args.images} test images, batch {args.batch}, "
          f"{torch.get_num_threads()} threads (fit: features + bank + index + densities, ONNX Runtime features)\n")
    print("| preset | mode | engine | fit s | images/s | features share | max rel. score diff |")
    print("|---|---|---|---:|---:|---:|---:|")
    for preset, mode, engine, fit_s, rate, share, diff in rows:
        print(f"| {preset} | {mode} | {engine} | {fit_s:.0f} | {rate:.1f} | {100 * share:.0f}% | {diff:.1e} |")


if __name__ == "__main__":
    main()
