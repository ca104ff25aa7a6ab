"""Which layers does DefectMaker fine-tuning move? Compares a fine-tuned backbone with its ImageNet start.

Prints, per block of the network, the relative change ||W_ft - W_0|| / ||W_0|| of the convolution
weights, of the BatchNorm affine parameters and of the BatchNorm running statistics, and then how far
the stage-2 and stage-3 features the detector uses moved on a few training images (1 - cosine
similarity per patch, averaged). With --write-imagenet-bn it also writes a copy of the fine-tuned
weights with ImageNet BatchNorm running statistics put back, to test whether statistics drift alone
explains a change in scores (evaluate it with `--set backbone.finetuned=<that file>`).

    .venv/bin/python bench/weight_drift.py --weights outputs/backbones/pill-defectmaker.safetensors \
        --root ../shared/data/mvtec_ad --category pill
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

import numpy as np
import torch
from safetensors.torch import save_file

from reb_dist.core.backbones import DEFAULT_BACKBONE, build_backbone, load_weights_file
from reb_dist.io.data.dataset import ImageDataset
from reb_dist.io.data.layouts import load_split

RUNNING = ("running_mean", "running_var")


def block_of(key: str) -> str:
    """'blocks.2.1.conv_pw.weight' -> 'blocks.2'; stem and head keys keep their first name."""
    m = re.match(r"(blocks\.\d+|layer\d+|features)\.", key)
    return m.group(1) if m else key.split(".")[0]


def kind_of(key: str, tensor: torch.Tensor) -> str | None:
    if key.endswith(RUNNING):
        return "bn_stats"
    if key.endswith("num_batches_tracked"):
        return None
    return "conv" if tensor.dim() == 4 else "bn_affine"


def relative_drift(start: dict, tuned: dict) -> dict[str, dict[str, float]]:
    """{block: {kind: ||delta|| / ||start||}} over the keys both state dicts share."""
    num, den = defaultdict(float), defaultdict(float)
    for key, w0 in start.items():
        if key not in tuned or (kind := kind_of(key, w0)) is None:
            continue
        w0, w1 = w0.double(), tuned[key].double()
        num[block_of(key), kind] += float((w1 - w0).pow(2).sum())
        den[block_of(key), kind] += float(w0.pow(2).sum())
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (block, kind), n in num.items():
        out[block][kind] = (n / max(den[block, kind], 1e-30)) ** 0.5
    return out


def stage_features(backbone, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [f.double() for f in backbone.model(images)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True, help="fine-tuned backbone (safetensors)")
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--root", help="dataset root, for the feature drift")
    ap.add_argument("--category")
    ap.add_argument("--layout", default="mvtec")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--write-imagenet-bn", metavar="PATH",
                    help="write the fine-tuned weights with ImageNet BatchNorm running statistics")
    args = ap.parse_args(argv)
    print("command:", " ".join([sys.executable.split("/")[-1], *sys.argv]))

    start = build_backbone(args.backbone)
    tuned = build_backbone(args.backbone, weights=args.weights)
    s0, s1 = start.model.net.state_dict(), tuned.model.net.state_dict()
    # Only what the file holds: keys it lacks (the ImageNet classifier) were never fine-tuned.
    in_file = {k.removeprefix("backbone.").removeprefix("net.") for k in load_weights_file(args.weights)}
    drift = relative_drift({k: v for k, v in s0.items() if k in in_file}, s1)
    print(f"\nrelative weight change ||W_ft - W_0|| / ||W_0|| ({args.weights})")
    print(f"{'block':<12}{'conv':>10}{'bn affine':>12}{'bn stats':>12}")
    for block in sorted(drift, key=lambda b: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", b)]):
        d = drift[block]
        print(f"{block:<12}" + "".join(f"{d.get(k, float('nan')):>{w}.4f}"
                                       for k, w in (("conv", 10), ("bn_affine", 12), ("bn_stats", 12))))

    if args.root and args.category:
        split = load_split(args.layout, args.root, args.category)
        paths = split.train[: args.images]
        data = ImageDataset(paths, image_size=args.image_size)
        images = torch.stack([data[i]["image"] for i in range(len(data))])
        f0, f1 = stage_features(start, images), stage_features(tuned, images)
        print(f"\nfeature drift on {len(paths)} training images of {args.category} (per patch)")
        for name, a, b in zip(("stage 2", "stage 3"), f0, f1):
            cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
            rel = (b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
            print(f"  {name}: 1 - cosine {float(1 - cos.mean()):.4f}, relative L2 change {float(rel.mean()):.4f}")

    if args.write_imagenet_bn:
        mixed = {k: (s0[k] if k.endswith(RUNNING) else v).contiguous() for k, v in s1.items()}
        save_file(mixed, args.write_imagenet_bn)
        print(f"\nwrote {args.write_imagenet_bn}: fine-tuned weights, ImageNet BatchNorm running statistics")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
