"""`reb`: fit, evaluate, benchmark and predict from the command line.

Every subcommand takes `--config FILE` (YAML/JSON) and any number of `--set section.key=value`
overrides; the resolved settings are printed, saved beside the outputs and logged to MLflow.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np

from reb_dist.config import RunConfig
from reb_dist.errors import RebError

RESULT_COLUMNS = ["category", "method", "image_auroc", "pixel_auroc", "aupro", "image_f1", "seconds"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML/JSON settings file")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set scoring.k=5 (repeatable)")
    p.add_argument("--root", help="dataset root (shortcut for --set data.root=...)")
    p.add_argument("--categories", help="comma-separated categories (data.categories)")
    p.add_argument("--methods", help="comma-separated scoring methods (scoring.methods), "
                                     "e.g. ldknn,knn,nn1 or ldknn:k=5,alpha=0.5")
    p.add_argument("--backbone", help="backbone name (backbone.name)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="build and save a memory bank (with densities) per category")
    _add_common(p)
    p.add_argument("--output", "-o", help="model file (one category) or folder (default: "
                                          "<output_dir>/models/<category>.safetensors)")

    p = sub.add_parser("evaluate", help="score a category's test set with a saved model")
    _add_common(p)
    p.add_argument("--model", "-m", required=True, help="a .safetensors model written by `reb fit`")

    p = sub.add_parser("benchmark", help="several methods x categories in one run, printing a table")
    _add_common(p)

    p = sub.add_parser("finetune", help="REB's DefectMaker self-supervised fine-tuning on Ray "
                                        "(Ray Data stream -> Ray Train), one backbone file per category")
    _add_common(p)
    p.add_argument("--output", "-o", help="backbone file (one category) or folder (default: "
                                          "<output_dir>/backbones/<category>-<task>.safetensors)")

    p = sub.add_parser("tune", help="per-class LDKNN K and alpha on a validation split (Ray Tune + Optuna), "
                                    "then test metrics of per-class vs global vs default settings")
    _add_common(p)

    p = sub.add_parser("report", help="compare backbones and methods across everything an MLflow store holds "
                                      "(table, AUROC per class per backbone, K/alpha surface per class)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", action="append", help="only these experiments (repeatable; default: all)")
    p.add_argument("--output", "-o", default="outputs/report")

    p = sub.add_parser("predict", help="score images with a saved model, write heatmap overlays")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--output", "-o", default="predictions", help="folder for overlays and scores.csv")
    p.add_argument("--threshold", type=float, help="flag images whose score is at least this")
    p.add_argument("--device", default=None)
    return parser


def load_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    for flag, key in (("root", "data.root"), ("categories", "data.categories"),
                      ("methods", "scoring.methods"), ("backbone", "backbone.name")):
        if getattr(args, flag, None):
            overrides.append(f"{key}={getattr(args, flag)}")
    if getattr(args, "no_mlflow", False):
        overrides.append("tracking.enabled=false")
    return RunConfig.load(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command_line = "reb " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        return {"fit": cmd_fit, "evaluate": cmd_evaluate, "benchmark": cmd_benchmark,
                "finetune": cmd_finetune, "tune": cmd_tune, "report": cmd_report,
                "predict": cmd_predict}[args.command](args, command_line)
    except RebError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_fit(args, command_line: str) -> int:
    from reb_dist.pipelines.evaluate import categories_of, fit_detector, load_category
    from reb_dist.io.tracking import Tracker

    cfg = load_config(args)
    paths = _output_files(args.output, categories_of(cfg.data), Path(cfg.output_dir) / "models", "")
    tracker = Tracker(cfg.tracking)
    with tracker.run(cfg, "fit"):
        for category, path in paths.items():
            split = load_category(cfg.data, category)
            with closing(fit_detector(cfg, split)) as detector:
                detector.save(path)
            info = {"bank_size": len(detector.bank), "feature_dim": detector.bank.shape[1],
                    **{f"seconds/{k}": v for k, v in detector.timings.seconds.items()}}
            tracker.log_result(category, "fit", info)
            print(f"{category}: {len(split.train)} images -> bank {detector.bank.shape} "
                  f"(+ densities K={cfg.scoring.k}) saved to {path}")
    return 0


def _output_files(output: str | None, categories: list[str], default_dir: Path, suffix: str) -> dict[str, Path]:
    """One .safetensors file per category: `output` itself for one category, else inside `output`."""
    if output and output.endswith(".safetensors"):
        if len(categories) != 1:
            raise SystemExit(f"--output {output} is one file but there are {len(categories)} categories")
        return {categories[0]: Path(output)}
    folder = Path(output) if output else default_dir
    return {c: folder / f"{c}{suffix}.safetensors" for c in categories}


def cmd_evaluate(args, command_line: str) -> int:
    from reb_dist.core.detector import Detector
    from reb_dist.pipelines.evaluate import categories_of, evaluate_category, shard_dir
    from reb_dist.io.tracking import Tracker

    cfg = load_config(args)
    categories = categories_of(cfg.data)
    if len(categories) != 1:
        raise SystemExit(f"a model belongs to one category; choose one of {categories} with --categories")
    detector = Detector.load(args.model, bank=cfg.bank, shard_dir=shard_dir(cfg, categories[0]))
    cfg.scoring, cfg.backbone = detector.scoring, detector.backbone_config
    cfg.data.image_size = detector.image_size
    tracker = Tracker(cfg.tracking)
    with closing(detector), tracker.run(cfg, "evaluate"):
        result = evaluate_category(cfg, categories[0], detector, [detector.default_method])
        rows = _rows([result])
        _report(rows, cfg, tracker, [result], command_line, "evaluate")
    return 0


def cmd_benchmark(args, command_line: str) -> int:
    from reb_dist.pipelines.evaluate import categories_of, evaluate_category
    from reb_dist.io.tracking import Tracker

    cfg = load_config(args)
    start = time.perf_counter()
    tracker = Tracker(cfg.tracking)
    print(f"# {command_line}")
    results = []
    with tracker.run(cfg, "benchmark"):
        for category in categories_of(cfg.data):
            variants = [("", cfg)]
            if cfg.backbone.finetuned:
                tuned = RunConfig.from_dict(cfg.to_dict())
                tuned.backbone.weights = cfg.backbone.finetuned.format(category=category)
                variants.append(("defectmaker", tuned))
            for variant, run_cfg in variants:
                result = evaluate_category(run_cfg, category, examples=cfg.tracking.heatmap_examples)
                result.variant = variant
                results.append(result)
                for m in result.methods:
                    tracker.log_result(category, result.label(m.method), m.metrics,
                                       {"k": m.method.k, "alpha": m.method.alpha,
                                        "weights": run_cfg.backbone.weights or "imagenet"})
                print(f"{category}{' ' + variant if variant else ''}: bank {result.bank_size} x "
                      f"{result.feature_dim}, {len(result.labels)} test images, {result.timings['total']:.0f} s "
                      f"({', '.join(f'{k} {v:.1f}' for k, v in result.timings.items() if k != 'total')})",
                      flush=True)
        rows = _rows(results)
        _report(rows, cfg, tracker, results, command_line, "benchmark",
                wall=time.perf_counter() - start)
    return 0


def _rows(results) -> list[dict]:
    rows = []
    for r in results:
        for m in r.methods:
            seconds = r.timings.get("search", 0) + r.timings.get(f"score:{m.method.label}", 0)
            rows.append({"category": r.category, "method": r.label(m.method),
                         **{k: m.metrics.get(k, float("nan")) for k in RESULT_COLUMNS[2:6]},
                         "seconds": int(round(seconds))})
    return rows


def _report(rows, cfg: RunConfig, tracker, results, command_line: str, name: str, wall: float | None = None):
    from reb_dist.reporting.plots import results_table_markdown, results_table_text

    out = Path(cfg.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    print()
    print(results_table_text(rows, RESULT_COLUMNS))
    markdown = results_table_markdown(rows, RESULT_COLUMNS)
    footer = f"\n\nCommand: `{command_line}`" + (f"  \nWall time: {wall:.0f} s" if wall else "") + "\n"
    _write_text(out / "results.md", markdown + footer)
    _write_text(out / "results.json", json.dumps(
        {"command": command_line, "wall_seconds": wall, "config": cfg.to_dict(),
         "results": [{"category": r.category, "method": r.label(m.method), "metrics": m.metrics,
                      "timings": r.timings, "bank_size": r.bank_size} for r in results for m in r.methods]},
        indent=2, default=float))
    cfg.dump(out / "config.yaml")
    tracker.log_text(markdown + footer, f"{name}_results.md")
    tracker.log_table(rows, f"{name}_results.json")
    for r in results:
        for path in _plots(r, cfg, out):
            tracker.log_artifact(path, "plots")
    if wall is not None:
        print(f"\nwall time {wall:.0f} s; results in {out}/results.md")


def _plots(result, cfg: RunConfig, out: Path) -> list[Path]:
    """ROC curves of every method, and a heatmap gallery of the first method."""
    from reb_dist.io.data import read_image, read_mask
    from reb_dist.io.data.dataset import resize_mask
    from reb_dist.reporting.plots import heatmap_grid, plot_roc_curves
    from PIL import Image

    name = f"{result.category}{'_' + result.variant if result.variant else ''}"
    paths = [plot_roc_curves({result.label(m.method): (result.labels, m.image_scores) for m in result.methods},
                             out / f"roc_{name}.png", title=f"{name}: image ROC")]
    first = result.methods[0]
    if first.examples:
        size = cfg.data.image_size
        items = []
        for i, pixel_map in first.examples:
            sample = result.split.test[i]
            image = np.asarray(Image.fromarray(read_image(sample.image_path)).resize((size, size), Image.BICUBIC))
            mask = None
            if sample.mask_path is not None:
                mask = resize_mask(read_mask(sample.mask_path), size)[0].numpy() > 0.5
            items.append((f"{sample.defect_type} {sample.image_path.stem} "
                          f"{first.image_scores[i]:.3g}", image, pixel_map, mask))
        maps = np.stack([m for _, m in first.examples])
        paths.append(heatmap_grid(items, out / f"heatmaps_{name}.png",
                                  vmin=float(maps.min()), vmax=float(maps.max())))
    return paths


def cmd_finetune(args, command_line: str) -> int:
    from reb_dist.pipelines.evaluate import categories_of
    from reb_dist.distributed.finetune import finetune
    from reb_dist.io.tracking import Tracker

    cfg = load_config(args)
    paths = _output_files(args.output, categories_of(cfg.data), Path(cfg.output_dir) / "backbones",
                          f"-{cfg.finetune.task}")
    tracker = Tracker(cfg.tracking)
    for category, path in paths.items():
        cfg.tracking.run_name = f"finetune-{category}-{cfg.backbone.name}-{cfg.finetune.task}"
        with tracker.run(cfg, "finetune"):
            out = Path(cfg.output_dir) / "finetune" / category
            tracker.log_artifact(_defect_gallery(cfg, category, out / "defect_gallery.png"), "plots")
            start = time.perf_counter()
            result = finetune(cfg, category, path, tracker)
            tracker.log_metrics({"wall_seconds": time.perf_counter() - start})
            print(f"{category}: {cfg.finetune.steps} steps (resumed from {result.resumed_from_step}) in "
                  f"{time.perf_counter() - start:.0f} s; final {result.final_metrics.get('loss', float('nan')):.3f} "
                  f"loss, {result.final_metrics.get('accuracy', float('nan')):.3f} accuracy; backbone -> {path}")
            print(f"use it: reb benchmark --categories {category} --set backbone.finetuned={path}")
    return 0


def cmd_tune(args, command_line: str) -> int:
    from reb_dist.distributed.tuning import tune_classes
    from reb_dist.pipelines.evaluate import categories_of
    from reb_dist.reporting.plots import results_table_markdown, results_table_text
    from reb_dist.io.tracking import Tracker

    cfg = load_config(args)
    start = time.perf_counter()
    tracker = Tracker(cfg.tracking)
    print(f"# {command_line}")
    with tracker.run(cfg, "tune"):
        selections, rows, glob = tune_classes(cfg, categories_of(cfg.data), tracker)
        table = [{"category": r["category"], "variant": r["variant"], "k": r["k"], "alpha": f"{r['alpha']:.3f}",
                  **{m: r["metrics"].get(m, float("nan")) for m in ("image_auroc", "pixel_auroc", "aupro")}}
                 for r in rows]
        columns = ["category", "variant", "k", "alpha", "image_auroc", "pixel_auroc", "aupro"]
        print()
        print(results_table_text(table, columns))
        wall = time.perf_counter() - start
        text = (results_table_markdown(table, columns) + f"\n\nValidation: {cfg.tune.validation}; global choice "
                f"K={glob['k']}, alpha={glob['alpha']:.3f}.  \nCommand: `{command_line}`  \nWall time: {wall:.0f} s\n")
        out = Path(cfg.output_dir) / "tune"
        _write_text(out / "results.md", text)
        cfg.dump(out / "config.yaml")
        tracker.log_text(text, "tune_results.md")
        for name in ("selection.json", "selection.csv", "splits.json"):
            tracker.log_artifact(out / name)
    print(f"\nwall time {wall:.0f} s; selected K and alpha in {out}/selection.csv")
    return 0


def cmd_report(args, command_line: str) -> int:
    from reb_dist.reporting.report import collect, write_report

    rows, trials = collect(args.tracking_uri, args.experiment)
    if not rows and not trials:
        raise SystemExit(f"{args.tracking_uri}: no finished result or trial runs to report")
    for path in write_report(rows, trials, args.output):
        print(path)
    return 0


def _defect_gallery(cfg: RunConfig, category: str, path: Path, n_images: int = 4) -> Path:
    """What the SSL task trains on: every class for a few training images of the category."""
    from reb_dist.io.data import read_image
    from reb_dist.core.defectmaker import DefectMaker
    from reb_dist.pipelines.evaluate import load_category
    from reb_dist.reporting.plots import defect_gallery

    f = cfg.finetune
    maker = DefectMaker(task=f.task, image_size=cfg.data.image_size, blend_prob=f.blend_prob, saliency=f.saliency)
    train = load_category(cfg.data, category).train
    rows = []
    for i in range(min(n_images, len(train))):
        source = read_image(train[(i + 1) % len(train)].image_path)
        samples = maker.sample_all(read_image(train[i].image_path), f.seed + i, source_image=source,
                                   image_path=train[i].image_path)
        rows.append([(maker.classes[s.class_id], s.image, s.mask) for s in samples])
    path.parent.mkdir(parents=True, exist_ok=True)
    return defect_gallery(rows, path)


def cmd_predict(args, command_line: str) -> int:
    from PIL import Image

    from reb_dist.io.data import is_image_file, read_image
    from reb_dist.io.data.dataset import preprocess
    from reb_dist.core.detector import Detector
    from reb_dist.reporting.plots import heatmap_overlay, save_png

    detector = Detector.load(args.model, args.device)
    paths = []
    for item in map(Path, args.images):
        paths += sorted(p for p in item.rglob("*") if is_image_file(p)) if item.is_dir() else [item]
    if not paths:
        raise SystemExit("no images found in " + " ".join(args.images))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    method = detector.default_method
    size = detector.image_size
    import torch

    records = []  # (path, original image, image score, pixel map)
    for s in range(0, len(paths), 16):
        chunk = paths[s:s + 16]
        images = [read_image(p) for p in chunk]
        batch = torch.stack([preprocess(im, size) for im in images])
        scores = detector.score_features(detector.extract([batch], desc="predict"), [method])[method]
        records += zip(chunk, images, scores.image_scores, detector.pixel_maps(scores.patch_maps))
    # One colour scale for every overlay of the run, so heatmaps compare across images.
    vmin = min(float(m.min()) for *_, m in records)
    vmax = max(float(m.max()) for *_, m in records)
    lines = ["image,score" + (",anomalous" if args.threshold is not None else "")]
    for p, image, score, pixel_map in records:
        full = np.asarray(Image.fromarray(pixel_map).resize(image.shape[1::-1], Image.BILINEAR))
        save_png(heatmap_overlay(image, full, vmin=vmin, vmax=vmax), out / f"{p.stem}_heatmap.png")
        flag = f",{int(score >= args.threshold)}" if args.threshold is not None else ""
        lines.append(f"{p},{score:.6g}{flag}")
    _write_text(out / "scores.csv", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{len(paths)} heatmap overlays written to {out}")
    return 0


def _write_text(path: Path, text: str) -> None:
    from reb_dist.reporting.plots import write_text_atomic

    write_text_atomic(path, text)


if __name__ == "__main__":
    sys.exit(main())
