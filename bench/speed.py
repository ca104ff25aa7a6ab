"""Search modes of one category side by side: exact vs faithful vs coreset densities (or any variant).

Features are extracted once (their time and rate are printed); every variant then fits its bank
(coreset + index + every bank point's density, as `reb fit` stores them), scores the test set with
every method from one search, and reports image AUROC, pixel AUROC and AUPRO per method; per variant
the test search's and the density search's recall against exact, fit seconds, inference images/s
(features + search of the first method with the fitted densities, as `reb predict` runs) and bank
memory. The first variant is the reference: each other one is compared with it (largest metric
differences; the ranking of methods per metric, differences under 0.3 counting as ties).
torch's float32 GEMM rate on this machine is the ceiling of the exact search.

Prints markdown tables and the command that made them. Example:
    .venv/bin/python bench/speed.py --root /work/shared/data/mvtec_ad --category pill \
        --variants exact,faithful,coreset-densities --methods nn1,knn,ldknn,ldknn:k=25,ldknn+map:knn
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, print_command

from reb_dist.config import PRESETS, RunConfig
from reb_dist.core.detector import Detector
from reb_dist.core.ldknn import ScoringMethod, parse_method
from reb_dist.core.ldknn.formulas import NEIGHBOUR_METHODS
from reb_dist.core.ldknn.refine import refine_top_patches
from reb_dist.core.metrics import evaluate
from reb_dist.detectors import bank_plan, build_detector, detector_scoring
from reb_dist.pipelines.evaluate import extract_with_masks, load_category, loader

METRICS = ("image", "pixel", "aupro")
TIE = 0.3  # ranking differences below this many AUROC points count as ties


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
    """A preset name | 'coreset:RATIO:METHOD' | 'query:KIND:NPROBE' -> bank overrides."""
    kind, *args = spec.split(":")
    if kind in PRESETS or kind == "fast":
        return [f"preset={kind}"]
    if kind == "coreset":
        return [f"bank.coreset_ratio={args[0]}", f"bank.coreset_method={args[1] if len(args) > 1 else 'fast'}"]
    if kind == "query":
        return [f"bank.query_search={args[0]}", f"bank.nprobe={args[1] if len(args) > 1 else 0}"]
    raise SystemExit(f"unknown variant {spec!r}")


def parse_methods(text: str, cfg: RunConfig) -> list[ScoringMethod]:
    """'nn1,knn,ldknn:k=25,ldknn+map:knn' -> methods; 'A+map:B' scores the image with A, the map with B."""
    s = cfg.scoring
    out = []
    for spec in filter(None, text.split(",")):
        own, _, mapped = spec.partition("+map:")
        out.append(parse_method(own.replace(";", ","), s.k, s.alpha, s.squared, map_spec=mapped.replace(";", ",")))
    return out


def refine_sweep(detector: Detector, methods: list[ScoringMethod], scores: dict, test: np.ndarray,
                 labels: np.ndarray, types: list[str], tops: list[int], spec: str) -> None:
    """Image AUROC of each neighbour method with each image's `top` hottest patches scored again
    exactly (`refine_top_patches`), from the unrefined maps: how many patches the refinement needs."""
    n, h, w, d = test.shape
    for m in methods:
        if m.map is not None or m.name not in NEIGHBOUR_METHODS:  # coupled: its patch maps are its image maps
            continue
        approx = scores[m].patch_maps.reshape(n, h * w)
        for top in tops:
            refined, changed = (approx, 0) if top == 0 else refine_top_patches(
                detector.index, m.image, test.reshape(n, h * w, d), approx, top)
            auroc = 100 * evaluate(labels, refined.max(axis=1), types)["image_auroc"]
            print(f"{spec}: {m.label}: refine_top={top}: image AUROC {auroc:.2f} ({changed} patch scores changed)",
                  flush=True)


def run_variant(spec: str, base: list[str], methods_text: str, backbone, train: np.ndarray, test: np.ndarray,
                masks: np.ndarray, split, feature_s_per_image: float,
                refine_tops: list[int] | None = None) -> tuple[dict, dict]:
    cfg = RunConfig.load(None, base + variant_settings(spec) + (["bank.refine_top=0"] if refine_tops else []))
    b = cfg.backbone
    detector = Detector(backbone, detector_scoring(cfg.scoring), cfg.data.image_size, aggregation=b.aggregation,
                        layer_dim=b.layer_dim, target_dim=b.target_dim, device=b.device, bank=bank_plan(cfg.bank))
    t0 = time.perf_counter()
    detector.fit_features(train)
    index = detector.index
    for kind in {index.query_search, index.neighbour_search} - {"exact"}:
        index.approximate_index(kind)  # built at fit time, as a saved model would need it
    detector.compute_density()
    fit_s = time.perf_counter() - t0 - detector.timings.seconds.get("recall", 0.0)
    # inference as predict runs it: the default method with the fitted densities (one search, K=1)
    default = parse_method("ldknn", cfg.scoring.k, cfg.scoring.alpha, cfg.scoring.squared)
    before = detector.timings.seconds.get("recall", 0.0)
    _, infer_s = _timed(lambda: detector.score_features(test, [default]))
    infer_s -= detector.timings.seconds.get("recall", 0.0) - before
    methods = parse_methods(methods_text, cfg)
    scores = detector.score_features(test, methods)
    labels = np.array([s.label for s in split.test])
    types = [s.defect_type for s in split.test]
    keep = np.array([s.label == 0 or s.mask_path is not None for s in split.test])
    if refine_tops and detector.search_mode == "faithful":
        refine_sweep(detector, methods, scores, test, labels, types, refine_tops, spec)
    summary = {"variant": spec, "mode": detector.search_mode, "bank": len(detector.bank), "fit_s": fit_s,
               "images_per_s": len(labels) / (feature_s_per_image * len(labels) + infer_s),
               "bank_mb": detector.bank.nbytes / 2 ** 20,
               "query_recall": max(detector.query_recall.items())[1] if detector.query_recall else 1.0,
               "density_recall": max(detector.density_recall.items())[1] if detector.density_recall else 1.0,
               "calibration": getattr(index, "calibration", {}),
               "query_calibration": getattr(index, "query_calibration", {})}
    rows = {}
    for m in methods:
        s = scores[m]
        image = evaluate(labels, s.image_scores, types)
        pixel = evaluate(labels[keep], s.image_scores[keep], [t for t, k in zip(types, keep) if k],
                         masks[keep], detector.pixel_maps(s.patch_maps[keep]))
        rows[m.label] = {"image": 100 * image["image_auroc"], "pixel": 100 * pixel.get("pixel_auroc", np.nan),
                         "aupro": 100 * pixel.get("aupro", np.nan)}
    detector.close()
    return summary, rows


def ranking_agrees(reference: dict, other: dict, metric: str) -> bool:
    """Whether every pair of methods is ordered the same way, where both differ by at least TIE points."""
    labels = list(reference)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            ref, got = reference[a][metric] - reference[b][metric], other[a][metric] - other[b][metric]
            if abs(ref) >= TIE and abs(got) >= TIE and np.sign(ref) != np.sign(got):
                return False
    return True


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |", flush=True)


def main() -> None:
    p = bench_parser(__doc__.split("\n")[0])
    p.add_argument("--variants", default="exact,faithful,coreset-densities")
    p.add_argument("--selection", help="a reb tune selection.json: the bank leaves out the training images that tune "
                   "held out for validation, as `reb fit --selection` does (the tune's own bank)")
    p.add_argument("--refine-tops", help="e.g. 0,1,8,32: the table's rows unrefined (bank.refine_top=0), and each "
                   "faithful variant's image AUROC with each number of hottest patches per image scored again exactly")
    p.add_argument("--methods", default="nn1,knn,ldknn,ldknn:k=25,ldknn+map:knn",
                   help="comma-separated; 'A+map:B' = image score A, anomaly map B; ';' for a comma inside a method (ldknn:k=61;alpha=1.75)")
    args = p.parse_args()
    print_command()
    base = [f"data.root={args.root}", "tracking.enabled=false", "cache.enabled=false", *args.overrides]
    cfg = RunConfig.load(None, base)
    print(f"torch float32 GEMM: {gemm_gflops():.1f} GFLOP/s on {torch.get_num_threads()} threads")
    split = load_category(cfg.data, args.category)
    if args.selection:
        held_out = set(json.loads(Path(args.selection).read_text())["per_class"][args.category]["held_out_train"])
        split = replace(split, train=[s for s in split.train if str(s.image_path) not in held_out])
        print(f"{args.selection}: {len(held_out)} training images held out of the bank, as tune did")
    detector = build_detector(cfg.backbone, cfg.scoring, cfg.data.image_size, cfg.bank)
    batches = loader(split.train, cfg.data)
    train, train_s = _timed(lambda: detector.extract(batches, total=len(batches), desc="train features"))
    (test, masks), test_s = _timed(lambda: extract_with_masks(detector, split.test, cfg.data, "test features"))
    per_image = test_s / len(split.test)
    print(f"{args.category}: {len(split.train)} train images ({train_s:.0f} s), {len(split.test)} test images "
          f"({test_s:.0f} s, {1 / per_image:.1f} images/s of features alone); bank {train.shape}")
    summaries, results = [], []
    for spec in filter(None, args.variants.split(",")):
        summary, rows = run_variant(spec, base, args.methods, detector.backbone, train, test, masks, split, per_image,
                                    [int(t) for t in args.refine_tops.split(",")] if args.refine_tops else None)
        summaries.append(summary)
        results.append(rows)
        print(f"{spec}: {summary}", flush=True)
        for label, r in rows.items():  # now, so a run stopped in a later variant keeps this one's figures
            print(f"{spec}: {label}: " + " / ".join(f"{r[m]:.2f}" for m in METRICS), flush=True)
    print(f"\n{args.category}: image AUROC / pixel AUROC / AUPRO (%)")
    print_table(["method"] + [s["variant"] for s in summaries],
                [[label] + [" / ".join(f"{r[label][m]:.1f}" for m in METRICS) for r in results] for label in results[0]])
    print(f"\n{args.category}: cost and recall (recall@K against exact on seeded samples)")
    print_table(["variant", "mode", "bank points", "query recall", "density recall", "fit s", "images/s", "bank MB"],
                [[s["variant"], s["mode"], str(s["bank"]), f"{s['query_recall']:.4f}", f"{s['density_recall']:.4f}",
                  f"{s['fit_s']:.1f}", f"{s['images_per_s']:.1f}", f"{s['bank_mb']:.0f}"] for s in summaries])
    ref = summaries[0]
    print(f"\n{args.category}: against {ref['variant']} (largest |difference| over methods; same ranking of methods, "
          f"ties < {TIE})")
    out = []
    for s, r in zip(summaries[1:], results[1:]):
        diffs = {m: max(abs(r[label][m] - results[0][label][m]) for label in r) for m in METRICS}
        out.append([s["variant"], *(f"{diffs[m]:.2f}" for m in METRICS),
                    *("yes" if ranking_agrees(results[0], r, m) else "NO" for m in METRICS),
                    f"{ref['fit_s'] / s['fit_s']:.1f}x"])
    print_table(["variant", "max d image", "max d pixel", "max d AUPRO", "same image ranking", "same pixel ranking",
                 "same AUPRO ranking", "fit speed-up"], out)


if __name__ == "__main__":
    main()
