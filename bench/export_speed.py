"""Images/s on CPU of one model three ways: the in-process Detector (faiss), its TorchScript export
(torch.jit.load) and its ONNX export (onnxruntime).

Fits one category's bank (a coreset, as the fast preset makes it, searched exactly so the three
paths compute the same scores), saves it, exports it both ways (`reb_dist.export.writer`), then
scores the test images in batches with each. Images are read and resized beforehand and the same
uint8 arrays go to every path, so the figures are the model's own: features + search + scores +
maps (in process also the float conversion and ImageNet normalisation the exports do inside).
Each path runs two warm-up batches first. Prints a markdown table (with each path's largest
relative score difference from in process), the load average before and after, and the command.

Example:
    .venv/bin/python bench/export_speed.py --root ../shared/data/mvtec_ad --category bottle \
        --coreset 0.1 --batch-sizes 1,8 --threads 1,2 --images 32
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, print_command

from reb_dist.config import RunConfig
from reb_dist.export.runtime import load_exported, resize
from reb_dist.export.writer import export_model
from reb_dist.io.data import IMAGENET_MEAN, IMAGENET_STD, read_image
from reb_dist.io.model_file import load_model, save_model
from reb_dist.pipelines.evaluate import fit_detector, load_category


def in_process_scorer(detector):
    """uint8 (B, S, S, 3) -> image scores with the Detector, as `reb predict` scores a batch."""
    method = detector.default_method
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def score(images: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0 - mean) / std
        scores = detector.score_features(detector.extract([x], desc="predict"), [method])[method]
        detector.pixel_maps(scores.patch_maps)
        return scores.image_scores

    return score


def timed(score, images: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """images/s of `score` over all images in batches of `batch` (after two warm-up batches: TorchScript's
    profiling executor optimises on the second call), and the scores."""
    score(images[:batch])
    score(images[:batch])
    start = time.perf_counter()
    out = np.concatenate([score(images[s:s + batch]) for s in range(0, len(images), batch)])
    return len(images) / (time.perf_counter() - start), out


def main() -> None:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--coreset", type=float, default=0.1, help="bank.coreset_ratio")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", default="1,2", help="CPU threads of torch, faiss and onnxruntime, each in turn "
                                                    "(torch's OpenMP at 2 threads collapses on a loaded machine)")
    p.add_argument("--images", type=int, default=0, help="test images timed (0: all)")
    args = p.parse_args()
    cfg = RunConfig.load(None, [f"data.root={args.root}", f"data.categories=[{args.category}]",
                                "backbone.device=cpu", "tracking.enabled=false", "scoring.methods=[ldknn]",
                                f"bank.coreset_ratio={args.coreset}", "bank.coreset_method=fast",
                                "bank.query_search=exact", *args.overrides])
    load_before = os.getloadavg()
    split = load_category(cfg.data, args.category)
    start = time.perf_counter()
    detector = fit_detector(cfg, split)
    print(f"fit: {len(split.train)} train images, bank {len(detector.bank)} x {detector.bank.shape[1]} "
          f"({time.perf_counter() - start:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="export_speed_") as tmp:
        measure(args, cfg, split, detector, Path(tmp))
    print(f"\nload average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print_command()


def measure(args, cfg, split, detector, folder: Path) -> None:
    """Save and export the fitted model into `folder`, then print the table."""
    model = save_model(detector, folder / f"{args.category}.safetensors")
    detector.close()
    start = time.perf_counter()
    files = {fmt: export_model(model, fmt, folder / f"{args.category}.{ext}")[0]
             for fmt, ext in (("torchscript", "pt"), ("onnx", "onnx"))}
    print(f"export: {time.perf_counter() - start:.0f} s; ONNX {files['onnx'].stat().st_size / 1e6:.1f} MB, "
          f"TorchScript {files['torchscript'].stat().st_size / 1e6:.1f} MB")
    samples = split.test[:args.images] if args.images else split.test
    images = np.stack([resize(read_image(s.image_path), cfg.data.image_size) for s in samples])
    print(f"\n{len(images)} test images of {args.category}, {cfg.data.image_size} px\n")
    print("| runtime | threads | batch | images/s | max rel. score diff vs in-process |\n|---|---|---|---|---|")
    for threads in map(int, args.threads.split(",")):
        set_threads(threads)
        scorers = {"in-process Detector (faiss)": in_process_scorer(load_model(model, "cpu"))}
        for fmt, name in (("torchscript", "TorchScript (torch.jit.load)"), ("onnx", "ONNX Runtime (CPU)")):
            exported = load_exported(files[fmt], threads=threads)
            scorers[name] = lambda x, m=exported: m.score(x).scores
        for batch in map(int, args.batch_sizes.split(",")):
            reference = None
            for name, score in scorers.items():
                rate, scores = timed(score, images, batch)
                reference = scores if reference is None else reference
                diff = np.max(np.abs(scores - reference) / np.abs(reference))
                print(f"| {name} | {threads} | {batch} | {rate:.2f} | {diff:.1e} |", flush=True)


def set_threads(threads: int) -> None:
    """torch's and faiss's CPU threads (onnxruntime's are set per session)."""
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)

if __name__ == "__main__":
    main()
