"""Feature engines side by side on the same images, threads and batches: torch eager (the layout
reb-dist ran before engines existed), torch channels_last (the torch engine on CPU) and ONNX Runtime.

Each engine extracts the same real images (the category's test images, preprocessed once) in
batches of --batch, after one warm-up batch; the best of --repeat passes is reported, with the
largest difference of its features from torch eager's (relative to the largest magnitude).
The ONNX graph's export (once per backbone and image size, then cached) is timed apart.

Prints a markdown table and the command that made it. Example:
    .venv/bin/python bench/engines.py --root ../shared/data/mvtec_ad --category pill --images 64
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, print_command

from reb_dist.config import RunConfig
from reb_dist.core.feature_engines import TorchEngine, apply_threads, graph_key, onnxruntime_engine
from reb_dist.core.features import PatchFeatures
from reb_dist.detectors import build_detector
from reb_dist.io.data.dataset import preprocess
from reb_dist.io.data.images import read_image
from reb_dist.pipelines.evaluate import load_category


class EagerEngine:
    """What reb-dist ran before engines: the module in the default (NCHW) layout."""

    name = "torch eager"

    def __init__(self, features: PatchFeatures):
        self.model = features

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.model(images).permute(0, 2, 3, 1).contiguous().numpy()


def rate(engine, batches: list[torch.Tensor], repeat: int) -> tuple[float, np.ndarray]:
    """Best images/s over `repeat` passes (after one warm-up batch), and the features of the last pass."""
    engine(batches[0])
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = np.concatenate([engine(b) for b in batches])
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best, out


def main() -> None:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: the CPUs this process may use")
    args = p.parse_args()
    cfg = RunConfig.load(None, [f"data.root={args.root}", *args.overrides])
    threads = apply_threads(args.threads)
    split = load_category(cfg.data, args.category)
    paths = [s.image_path for s in split.test][:args.images]
    images = torch.stack([preprocess(read_image(path), cfg.data.image_size) for path in paths])
    batches = list(images.split(args.batch))
    detector = build_detector(cfg.backbone, cfg.scoring, cfg.data.image_size)
    features = detector.features.to("cpu").eval()
    b = detector.backbone
    with tempfile.TemporaryDirectory() as folder:
        key = graph_key(b.name, b.fingerprint, detector.aggregation, detector.layer_dim, detector.target_dim,
                        cfg.data.image_size)
        start = time.perf_counter()
        ort_engine = onnxruntime_engine(features, b.channels, key, cfg.data.image_size, Path(folder), threads)
        export_s = time.perf_counter() - start
        eager_rate, reference = rate(EagerEngine(features), batches, args.repeat)
        rows = [("torch eager", eager_rate, 0.0)]
        scale = float(np.abs(reference).max())
        for name, engine in (("torch channels_last", TorchEngine(features, torch.device("cpu"))),
                             ("onnxruntime", ort_engine)):
            r, out = rate(engine, batches, args.repeat)
            rows.append((name, r, float(np.abs(out - reference).max()) / scale))
    print_command()
    print(f"\n{args.category}: {len(paths)} images at {cfg.data.image_size} px, batch {args.batch}, {threads} threads, "
          f"{b.name} ({detector.aggregation}), features {tuple(reference.shape[1:])}; ONNX export {export_s:.1f} s\n")
    print("| engine | images/s | x torch eager | max abs diff / max abs |")
    print("|---|---:|---:|---:|")
    for name, r, diff in rows:
        print(f"| {name} | {r:.1f} | {r / eager_rate:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
