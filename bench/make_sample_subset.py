"""Make a category of the MVTec AD subset that ships with the package (reb_dist/sample_data/mvtec_ad_256).

A seeded random choice of the category's training images, of its normal test images and of its
anomalous test images per defect type (each with its ground-truth mask), downscaled to 256 px
(images bicubic, masks nearest, as the source itself was made) and written as PNG (lossless) with
the source's file names. MVTec AD's license.txt and readme.txt (CC BY-NC-SA 4.0) go beside the
category, and SUBSET.txt records the source, seed, counts and the command that makes it again.

    .venv/bin/python bench/make_sample_subset.py --category pill --train 32 --test-good 10 \\
        --test-defect 4 --seed 0

Run it again with the same arguments and source and it writes the same files; the category folder is
replaced whole. `--all` takes every image instead (a full 256-px copy, for measuring subsets).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "mvtec_ad"
OUT = REPO / "reb_dist" / "sample_data" / "mvtec_ad_256"
LICENCE_FILES = ("license.txt", "readme.txt")


def pick(files: list[Path], n: int | None, rng: np.random.Generator) -> list[Path]:
    """n of files chosen at random (all when n is None or at least their number), in sorted order."""
    files = sorted(files)
    if n is None or n >= len(files):
        return files
    return sorted(files[i] for i in rng.choice(len(files), n, replace=False))


def choose(category: Path, n_train: int | None, n_good: int | None, n_defect: int | None,
           seed: int) -> dict[str, list[Path]]:
    """{"train/good": images, "test/good": images, "test/<defect>": images, ...} of the source category."""
    rng = np.random.default_rng(seed)  # one generator, drawn in a fixed order: train, good, defects by name
    chosen = {"train/good": pick(list((category / "train" / "good").glob("*.png")), n_train, rng),
              "test/good": pick(list((category / "test" / "good").glob("*.png")), n_good, rng)}
    for defect in sorted(p.name for p in (category / "test").iterdir() if p.is_dir() and p.name != "good"):
        chosen[f"test/{defect}"] = pick(list((category / "test" / defect).glob("*.png")), n_defect, rng)
    return chosen


def save_resized(source: Path, target: Path, size: int, resample: Image.Resampling) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image.resize((size, size), resample).save(target, optimize=True)


def write_subset(source_root: Path, category: str, out: Path, chosen: dict[str, list[Path]], size: int,
                 note: str) -> int:
    """Write the chosen images (and masks) of `category` under out/category; returns the image count."""
    target = out / category
    if target.exists():
        shutil.rmtree(target)
    for folder, images in chosen.items():
        defect = folder.split("/")[1]
        for image in images:
            save_resized(image, target / folder / image.name, size, Image.Resampling.BICUBIC)
            if folder.startswith("test/") and defect != "good":
                mask = source_root / category / "ground_truth" / defect / f"{image.stem}_mask.png"
                if not mask.is_file():
                    sys.exit(f"{mask}: the ground-truth mask of {image} is missing")
                save_resized(mask, target / "ground_truth" / defect / mask.name, size, Image.Resampling.NEAREST)
    for name in LICENCE_FILES:  # CC BY-NC-SA 4.0: the licence and attribution travel with every copy
        shutil.copyfile(source_root / name, target / name)
        if not (out / name).exists():
            shutil.copyfile(source_root / name, out / name)
    (target / "SUBSET.txt").write_text(note)
    return sum(len(v) for v in chosen.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=SOURCE, help="MVTec AD root (CLASS/train/good, ...)")
    p.add_argument("--category", default="pill")
    p.add_argument("--train", type=int, default=32, help="training images")
    p.add_argument("--test-good", type=int, default=10, help="normal test images")
    p.add_argument("--test-defect", type=int, default=4, help="anomalous test images per defect type")
    p.add_argument("--all", action="store_true", help="every image (ignores the three counts)")
    p.add_argument("--seed", type=int, default=0, help="seed of which images are taken")
    p.add_argument("--size", type=int, default=256, help="side in pixels of the written images")
    p.add_argument("--out", type=Path, default=OUT, help="the subset root; the category folder is replaced")
    args = p.parse_args(argv)
    category = args.source / args.category
    if not (category / "train" / "good").is_dir():
        p.error(f"{category}: no train/good folder (--source is an MVTec AD root, --category a class in it)")
    counts = (None, None, None) if args.all else (args.train, args.test_good, args.test_defect)
    chosen = choose(category, *counts, args.seed)
    command = "bench/make_sample_subset.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [f"MVTec AD '{args.category}', a seeded random subset at {args.size} px (images bicubic, masks nearest,",
             f"PNG). Source: {os.path.relpath(category, REPO)} from the repository (MVTec AD, CC BY-NC-SA 4.0: see",
             "license.txt and readme.txt).",
             f"Seed {args.seed}; made by: .venv/bin/python {command}", ""]
    lines += [f"{folder}: {len(images)} ({', '.join(i.stem for i in images)})" for folder, images in chosen.items()]
    n = write_subset(args.source, args.category, args.out, chosen, args.size, "\n".join(lines) + "\n")
    print(f"{n} images of {args.category} in {args.out / args.category}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
