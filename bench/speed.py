"""The accuracy-speed trade-off of one category: exact vs coresets vs approximate test-patch search.

Features are extracted once (their time and rate are printed); every variant then fits its bank
(coreset + index + every bank point's density, as `reb fit` stores them), scores the test set with
KNN and LDKNN (K = 9, alpha = 1) from one search, and reports image AUROC, pixel AUROC, AUPRO, the
query search's recall@K against exact, fit seconds, end-to-end inference images/s (features +
search + scoring) and bank memory. torch's float32 GEMM rate on this machine is the ceiling.

Prints a markdown table and the command that made it. Example:
    .venv/bin/python bench/speed.py --root /work/shared/data/mvtec_ad --category pill \
        --variants exact,coreset:0.1:fast,query:ivf:16,fast
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import bench_parser, print_command

from reb_dist.config import PRESETS, RunConfig
from reb_dist.core.detector import Detector
from reb_dist.detectors import bank_plan, build_detector, detector_scoring
from reb_dist.core.ldknn import parse_method
from reb_dist.core.metrics import evaluate
from reb_dist.pipelines.evaluate import extract_with_masks, load_category, loader

METHODS = ("knn", "ldknn")


def gemm_gflops(n: int = 2048, repeat: int = 5) -> float:
    """torch's best float32 matrix-multiply rate here, GFLOP/s (the ceiling of exact search)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b)[1] for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def variant_settings(spec: str) -> list[str]:
    """'exact' | 'coreset:RATIO:METHOD' | 'query:KIND:NPROBE' | 'fast' (the preset) -> bank overrides."""
    kind, *args = spec.split(":")
    if kind == "exact":
        return []
    if kind == "coreset":
        return [f"bank.coreset_ratio={args[0]}", f"bank.coreset_method={args[1] if len(args) > 1 else 'fast'}"]
    if kind == "query":
        return [f"bank.query_search={args[0]}", f"bank.nprobe={args[1] if len(args) > 1 else 0}"]
    if kind in PRESETS:
        return [f"preset={kind}"]
    raise SystemExit(f"unknown variant {spec!r}")


def run_variant(spec: str, base: list[str], backbone, train: np.ndarray, test: np.ndarray, masks: np.ndarray,
                split, feature_s_per_image: float) -> dict:
    cfg = RunConfig.load(None, base + variant_settings(spec))
    b = cfg.backbone
    detector = Detector(backbone, detector_scoring(cfg.scoring), cfg.data.image_size, aggregation=b.aggregation,
                        layer_dim=b.layer_dim, target_dim=b.target_dim, device=b.device, bank=bank_plan(cfg.bank))
    t0 = time.perf_counter()
    detector.fit_features(train)
    index = detector.index
    for kind in {index.query_search, index.neighbour_search} - {"exact"}:
        index.approximate_index(kind)  # built at fit time, as a saved model would need it
    detector.compute_density()
    fit_s = time.perf_counter() - t0
    methods = [parse_method(m, cfg.scoring.k, cfg.scoring.alpha, cfg.scoring.squared) for m in METHODS]
    t0 = time.perf_counter()
    scores = detector.score_features(test, methods)
    score_s = time.perf_counter() - t0 - detector.timings.seconds.get("recall", 0.0)
    labels = np.array([s.label for s in split.test])
    types = [s.defect_type for s in split.test]
    row = {"variant": spec, "bank": len(detector.bank), "fit_s": fit_s,
           "images_per_s": len(labels) / (feature_s_per_image * len(labels) + score_s),
           "bank_mb": detector.bank.nbytes / 2 ** 20,
           "recall": max(detector.query_recall.items())[1] if detector.query_recall else 1.0}
    keep = np.array([s.label == 0 or s.mask_path is not None for s in split.test])
    for m in methods:
        s = scores[m]
        image = evaluate(labels, s.image_scores, types)
        pixel = evaluate(labels[keep], s.image_scores[keep], [t for t, k in zip(types, keep) if k],
                         masks[keep], detector.pixel_maps(s.patch_maps[keep]))
        row.update({f"{m.name}_image": image["image_auroc"], f"{m.name}_pixel": pixel.get("pixel_auroc", np.nan),
                    f"{m.name}_aupro": pixel.get("aupro", np.nan)})
    detector.close()
    return row


def main() -> None:
    p = bench_parser(__doc__.split("\n")[0])
    p.add_argument("--variants", default="exact,coreset:0.25:fast,coreset:0.1:fast,coreset:0.01:fast,"
                                         "coreset:0.1:greedy,coreset:0.1:random,query:ivf:4,query:ivf:16,query:ivf:0,fast")
    args = p.parse_args()
    print_command()
    base = [f"data.root={args.root}", "tracking.enabled=false", "cache.enabled=false", *args.overrides]
    cfg = RunConfig.load(None, base)
    print(f"torch float32 GEMM: {gemm_gflops():.1f} GFLOP/s on {torch.get_num_threads()} threads")
    split = load_category(cfg.data, args.category)
    detector = build_detector(cfg.backbone, cfg.scoring, cfg.data.image_size, cfg.bank)
    batches = loader(split.train, cfg.data)
    train, train_s = _timed(lambda: detector.extract(batches, total=len(batches), desc="train features"))
    (test, masks), test_s = _timed(lambda: extract_with_masks(detector, split.test, cfg.data, "test features"))
    per_image = test_s / len(split.test)
    print(f"{args.category}: {len(split.train)} train images ({train_s:.0f} s), {len(split.test)} test images "
          f"({test_s:.0f} s, {1 / per_image:.1f} images/s of features alone); bank {train.shape}")
    columns = ["variant", "bank", "knn_image", "knn_pixel", "knn_aupro", "ldknn_image", "ldknn_pixel", "ldknn_aupro",
               "recall", "fit_s", "images_per_s", "bank_mb"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for spec in filter(None, args.variants.split(",")):
        row = run_variant(spec, base, detector.backbone, train, test, masks, split, per_image)
        cells = [row["variant"], str(row["bank"])]
        cells += [f"{100 * row[c]:.1f}" for c in columns[2:8]]
        cells += [f"{row['recall']:.4f}", f"{row['fit_s']:.0f}", f"{row['images_per_s']:.1f}", f"{row['bank_mb']:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
