"""GPU check: patch features, exact torch search and KNN / LDKNN image scores on a device, against
the same images run through the CPU path (features and search on CPU), and the device's features
under autocast (bf16, fp16: `backbone.precision`) against its float32 ones.

Needs only torch, numpy, scikit-learn, timm with the backbone's weights package, and the project:
it imports no faiss, Ray or MLflow (it says so at the end), so it runs on a bare GPU machine. The
bank is every training patch (no coreset); one search with K serves KNN (mean of the K squared
distances) and LDKNN (squared distance to the nearest bank point minus alpha times that point's
density, the mean squared distance to its K nearest other bank points); image score = max patch.

Features are extracted by the detector's own torch engine (`TorchEngine`: what `reb` runs on a GPU,
with `backbone.precision` as its autocast dtype). Prints the command, images/s of features, of
search + scoring and end to end for each precision, image AUROC of both methods on each path, and
the largest differences of features and image scores against the device's float32 path and the CPU's.
Example:
    .venv/bin/python bench/gpu_check.py                      # the shipped sample bottles
    .venv/bin/python bench/gpu_check.py --root /data/mvtec_ad --category bottle --max-train 200
    .venv/bin/python bench/gpu_check.py --device cpu --precisions fp32,bf16   # the script itself, no GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from common import print_command
from sklearn.metrics import roc_auc_score

from reb_dist.config import SAMPLE_DATA
from reb_dist.core.anomaly_map import image_scores
from reb_dist.core.backbones import build_backbone
from reb_dist.core.feature_engines import PRECISIONS, TorchEngine
from reb_dist.core.features import PatchFeatures
from reb_dist.core.ldknn.torch_search import TorchIndex
from reb_dist.io.data import load_split, preprocess, read_image

METHODS = ("knn", "ldknn")


@dataclass
class PathResult:
    """What one path (device or CPU) measured and scored."""

    device: str
    precision: str
    seconds: dict[str, float]
    scores: dict[str, np.ndarray]  # method -> (n_test,) image scores
    nearest: np.ndarray  # (n_test patches,) id of each test patch's nearest bank point
    test_features: np.ndarray  # (n_test, h, w, d)
    bank_shape: tuple[int, int]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="sample", help='MVTec-layout root; "sample": the shipped bottles')
    p.add_argument("--category", default="bottle")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--max-train", type=int, default=200, help="first N training images by path (0: all)")
    p.add_argument("--max-test", type=int, default=0, help="N test images spread over the sorted list (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--no-cpu-path", action="store_true", help="skip the CPU path (no differences printed)")
    p.add_argument("--no-tf32", action="store_true", help="full float32 convolutions and matmuls on the GPU")
    p.add_argument("--precisions", default=None,
                   help="the device's forward-pass precisions, comma-separated, fp32 first (default: "
                        "fp32,bf16,fp16 on a GPU, fp32 on CPU)")
    args = p.parse_args()
    default = "fp32,bf16,fp16" if torch.device(args.device).type == "cuda" else "fp32"
    args.precisions = (args.precisions or default).split(",")
    if args.precisions[0] != "fp32" or not set(args.precisions) <= set(PRECISIONS):
        p.error(f"--precisions: fp32 first, then any of {PRECISIONS}; got {','.join(args.precisions)}")
    return args


def load_images(root: str, category: str, size: int, max_train: int, max_test: int):
    """Decode and preprocess the split's images: (train tensors, test tensors, test labels)."""
    split = load_split("mvtec", SAMPLE_DATA if root == "sample" else root, category, require_masks=False)
    train = sorted(split.train, key=lambda s: str(s.image_path))
    train = train[:max_train] if max_train > 0 else train
    test = sorted(split.test, key=lambda s: str(s.image_path))
    if 0 < max_test < len(test):
        test = [test[i] for i in np.linspace(0, len(test) - 1, max_test).round().astype(int)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda s: preprocess(read_image(s.image_path), size), train + test))
    labels = np.array([s.label for s in test])
    return torch.stack(images[:len(train)]), torch.stack(images[len(train):]), labels


def batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [images[s:s + batch_size] for s in range(0, len(images), batch_size)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(model: PatchFeatures, device: torch.device, train: torch.Tensor, test: torch.Tensor,
             args: argparse.Namespace, precision: str = "fp32") -> PathResult:
    """Features (the detector's torch engine, autocast to `precision`), bank, search and scores of
    one path, timed stage by stage (after a warm-up)."""
    seconds = {}
    engine = TorchEngine(model, device, precision=precision)
    pin = device.type == "cuda"
    train_b = [b.pin_memory() if pin else b for b in batches(train, args.batch_size)]
    test_b = [b.pin_memory() if pin else b for b in batches(test, args.batch_size)]
    engine(test_b[0])  # warm-up: CUDA context, cuDNN's algorithm choice, the allocator
    synchronize(device)

    start = time.perf_counter()
    train_f = np.concatenate([engine(b) for b in train_b])  # numpy: synchronised by the copy to host
    seconds["train features"] = time.perf_counter() - start
    start = time.perf_counter()
    test_f = np.concatenate([engine(b) for b in test_b])
    seconds["test features"] = time.perf_counter() - start

    start = time.perf_counter()
    index = TorchIndex(train_f.reshape(-1, train_f.shape[-1]), device)
    synchronize(device)
    seconds["index"] = time.perf_counter() - start
    queries = test_f.reshape(-1, test_f.shape[-1])
    index.search(queries[:64], args.k)  # warm-up: cuBLAS handles, top-k kernels

    start = time.perf_counter()
    dist2, ids = index.search(queries, args.k)
    seconds["search"] = time.perf_counter() - start
    start = time.perf_counter()
    nearest = ids[:, 0]
    needed = np.unique(nearest)  # densities only of the bank points test patches land next to
    density = np.full(len(index), np.nan, np.float32)
    density[needed] = index.search_bank_points(needed, args.k)[0].mean(axis=1, dtype=np.float64)
    patch = {"knn": dist2[:, :args.k].mean(axis=1), "ldknn": dist2[:, 0] - args.alpha * density[nearest]}
    n, h, w, _ = test_f.shape
    scores = {m: image_scores(patch[m].reshape(n, h, w), "max") for m in METHODS}
    seconds["density + scoring"] = time.perf_counter() - start
    bank_shape = (len(index), index.dim)
    index.close()
    return PathResult(str(device), precision, seconds, scores, nearest, test_f, bank_shape)


def report(r: PathResult, n_train: int, n_test: int, labels: np.ndarray) -> None:
    s = r.seconds
    features = s["train features"] + s["test features"]
    search = s["search"] + s["density + scoring"]
    print(f"[{r.device} {r.precision}] bank {r.bank_shape[0]} x {r.bank_shape[1]}, {len(r.nearest)} test patches")
    n = n_train + n_test
    print(f"  features          {n / features:9.1f} images/s  ({n} images, {features:.2f} s)")
    print(f"  search + scoring  {n_test / search:9.1f} images/s  ({n_test} test images, {search:.2f} s: "
          f"search {s['search']:.2f}, density + scoring {s['density + scoring']:.2f}; index build {s['index']:.2f} s)")
    print(f"  end to end        {n_test / (s['test features'] + search):9.1f} images/s  (test features + search + "
          f"scoring); fit + score {n / (features + s['index'] + search):.1f} images/s")
    print("  image AUROC       " + ", ".join(f"{m} {roc_auc_score(labels, r.scores[m]):.4f}" for m in METHODS))


def compare(dev: PathResult, ref: PathResult) -> None:
    """The largest differences of `dev`'s test features, nearest bank points and image scores from `ref`'s."""
    f_abs = np.abs(dev.test_features - ref.test_features).max()
    f_rel = f_abs / np.abs(ref.test_features).max()
    same_nn = (dev.nearest == ref.nearest).mean()
    print(f"[{dev.device} {dev.precision} vs {ref.device} {ref.precision}] test features: max |diff| {f_abs:.3e} "
          f"({f_rel:.3e} of max |feature|); same nearest bank point for {100 * same_nn:.2f}% of test patches")
    for m in METHODS:
        a, b = dev.scores[m].astype(np.float64), ref.scores[m].astype(np.float64)
        diff = np.abs(a - b)
        rel = diff / np.maximum(np.abs(b), 1e-12)
        print(f"  {m:6s} image scores: max |diff| {diff.max():.3e}, max relative {rel.max():.3e} "
              f"(reference scores in [{b.min():.4g}, {b.max():.4g}])")


def main() -> None:
    args = parse_args()
    wall = time.perf_counter()
    print_command()
    device = torch.device(args.device)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"torch {torch.__version__}, device {device} ({gpu}), CPU threads {torch.get_num_threads()}, "
          f"TF32 conv {torch.backends.cudnn.allow_tf32} matmul {torch.backends.cuda.matmul.allow_tf32}")

    start = time.perf_counter()
    train, test, labels = load_images(args.root, args.category, args.image_size, args.max_train, args.max_test)
    print(f"{args.category}: {len(train)} train, {len(test)} test images ({int(labels.sum())} anomalous), decoded "
          f"+ resized in {time.perf_counter() - start:.1f} s; {args.backbone}, K={args.k}, alpha={args.alpha:g}")

    backbone = build_backbone(args.backbone)
    model = PatchFeatures(backbone.model, "avgpool")
    dev = run_path(model, device, train, test, args)
    report(dev, len(train), len(test), labels)
    for precision in args.precisions[1:]:
        reduced = run_path(model, device, train, test, args, precision)
        report(reduced, len(train), len(test), labels)
        compare(reduced, dev)
    if not args.no_cpu_path and device.type != "cpu":  # on CPU it would be compared with itself
        cpu = run_path(model, torch.device("cpu"), train, test, args)
        report(cpu, len(train), len(test), labels)
        compare(dev, cpu)

    imported = {name.split(".")[0] for name, module in sys.modules.items() if module is not None}
    loaded = sorted(imported & {"faiss", "ray", "mlflow"})
    print(f"faiss / Ray / MLflow imported: {', '.join(loaded) or 'none'}; total {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
