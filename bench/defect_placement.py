"""DefectMaker placement: how much of each synthetic defect lies on the object, and how thin the scars are.

For each class, every defect variant (6 per image) of the first --images training images is made as
fine-tuning makes it (256 px, default settings unless --saliency/--set), and its area (mask >= 0.5)
is compared with the weight-free object mask of placement.object_mask, turned like the sample
(dihedral augmentation). A texture gets the whole image as its object mask, so its on-object share is
1 by definition; what matters there is that centres still spread over the whole image (the share of
centres in the outer quarter band of each side is 0.75 for uniform centres). Scar shapes are measured
directly: widths from the distance transform (placement.stroke_widths), in px at 256. Visibility:
how many pixels each sample's defect changed by more than 20 grey levels (what the SSL head has to
see; a normal sample changes none). With
--gallery-dir it also writes each class's DefectMaker gallery (the first 3 images; each column's
title gives that defect class's mean on-object share over all the samples measured).

Prints figures and the command that made them. Example:
    .venv/bin/python bench/defect_placement.py --images 20 --gallery-dir docs
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import print_command

DEFAULT_DATA = ("bottle=../shared/data/mvtec_ad", "pill=../shared/data/mvtec_ad",
                "magnetic_tile=../shared/data/magnetic_tile")


VISIBLE_LEVELS = 20  # a pixel counts as changed by the defect when a channel moved more than this (of 255)
INVISIBLE_PIXELS = 20  # a sample that changed fewer pixels than this is next to invisible at 256 px


def changed_pixels(sample, base: np.ndarray) -> int:
    """How many pixels the defect visibly changed: the sample against the same image with the same
    augmentation (jitter, then flip/rotation) and no defect."""
    from reb_dist.core.defectmaker import dihedral
    from reb_dist.core.defectmaker.fills import apply_jitter

    clean = base if sample.meta["jitter"] is None else apply_jitter(base, sample.meta["jitter"])
    clean = dihedral(clean, sample.meta["dihedral"])
    return int((np.abs(sample.image.astype(np.int16) - clean.astype(np.int16)).max(2) > VISIBLE_LEVELS).sum())


def placement_figures(maker, paths, n_images: int, seed: int, gallery_images: int = 3) -> dict:
    from reb_dist.core.defectmaker import dihedral
    from reb_dist.core.defectmaker.placement import object_mask, on_object_fraction
    from reb_dist.io.data import read_image

    fractions, border, by_class, found, cut, changed = [], [], {}, [], [], {}
    secs, made, rows = 0.0, 0, []
    for i in range(min(n_images, len(paths))):
        image = read_image(paths[i])
        source = read_image(paths[(i + 1) % len(paths)])
        t = time.perf_counter()
        samples = maker.sample_all(image, seed + i, source_image=source, image_path=paths[i])
        secs += time.perf_counter() - t
        made += len(samples)
        if i < gallery_images:
            rows.append([(maker.classes[s.class_id], s.image, s.mask) for s in samples])
        base = maker.prepare(image)
        obj = object_mask(base)
        found.append(not obj.all())
        for s in samples:
            changed.setdefault(maker.classes[s.class_id], []).append(changed_pixels(s, base))
        for s in samples[1:]:
            f = on_object_fraction(s.mask, dihedral(obj, s.meta["dihedral"]))
            fractions.append(f)
            cut.append(bool(s.meta.get("placement_cut")))
            by_class.setdefault(maker.classes[s.class_id], []).append(f)
            h, w = s.mask.shape
            cy, cx = s.meta["centre"]
            border.append(min(cy, h - 1 - cy) < h / 4 or min(cx, w - 1 - cx) < w / 4)
    f = np.array(fractions)
    return {"n": f.size, "mean": f.mean(), "p5": np.percentile(f, 5), "ok": (f >= 0.95).mean(),
            "border": float(np.mean(border)), "found": float(np.mean(found)), "per_s": made / secs,
            "cut": float(np.mean(cut)), "by_class": by_class, "rows": rows, "changed": changed,
            "worst_class": min(by_class.items(), key=lambda kv: np.mean(kv[1]))}


def save_gallery(rows, by_class: dict, category: str, path) -> None:
    """The fine-tuning gallery (reporting.plots.defect_gallery) with each class's on-object share in its title."""
    from reb_dist.reporting.plots import defect_gallery

    titled = [(f"{name}\non object {np.mean(by_class[name]):.3f}" if name in by_class else f"{name} ({category})",
               image, mask) for name, image, mask in rows[0]]
    defect_gallery([titled, *rows[1:]], path, cell_inches=1.6)


def scar_figures(draws: int) -> dict:
    from reb_dist.core.defectmaker import SHAPES
    from reb_dist.core.defectmaker.placement import stroke_widths

    rng = np.random.default_rng(0)
    out = {}
    for name in ("bezier_scar", "rectangle_scar", "bezier"):
        med, top, area = [], [], []
        for _ in range(draws):
            m = SHAPES[name](rng, 256, 256, (128, 128))
            w = stroke_widths(m)
            med.append(np.median(w))
            top.append(w.max())
            area.append(int(m.sum()))
        out[name] = (np.median(med), np.percentile(med, 5), np.percentile(med, 95), np.max(top), np.median(area))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", action="append", default=None, metavar="CATEGORY=ROOT",
                   help=f"classes and their data roots (default: {' '.join(DEFAULT_DATA)})")
    p.add_argument("--images", type=int, default=20, help="base images per class (6 defects each)")
    p.add_argument("--saliency", default="spectral")
    p.add_argument("--scar-draws", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gallery-dir", default=None, help="also write DIR/defect_gallery_CATEGORY.png")
    args = p.parse_args()

    from reb_dist.config import RunConfig
    from reb_dist.core.defectmaker import DefectMaker
    from reb_dist.pipelines.evaluate import load_category

    print_command()
    maker = DefectMaker(image_size=256, saliency=args.saliency)
    visibility = {}
    print("class | samples | on-object mean | 5th pct | share >= 95% | centres in outer band | "
          "object found | cut to the object | worst class (mean) | samples/s")
    for item in args.data or DEFAULT_DATA:
        category, root = item.split("=", 1)
        cfg = RunConfig.load(None, [f"data.root={root}", "data.image_size=256"])
        paths = [str(s.image_path) for s in load_category(cfg.data, category).train]
        r = placement_figures(maker, paths, args.images, args.seed)
        name, worst = r["worst_class"]
        if args.gallery_dir:
            save_gallery(r["rows"], r["by_class"], category, f"{args.gallery_dir}/defect_gallery_{category}.png")
        print(f"{category} | {r['n']} | {r['mean']:.3f} | {r['p5']:.3f} | {r['ok']:.1%} | {r['border']:.2f} | "
              f"{r['found']:.0%} of images | {r['cut']:.1%} | {name} ({np.mean(worst):.3f}) | {r['per_s']:.1f}")
        visibility[category] = r["changed"]
    print(f"visibility: pixels a sample changed by > {VISIBLE_LEVELS} grey levels against the same augmented image "
          f"without its defect (median; share of samples under {INVISIBLE_PIXELS} px, i.e. near invisible at 256 px)")
    print("class | " + " | ".join(visibility[next(iter(visibility))]))
    for category, changed in visibility.items():
        print(f"{category} | " + " | ".join(f"{np.median(v):.0f} ({np.mean(np.array(v) < INVISIBLE_PIXELS):.0%})"
                                            for v in changed.values()))
    print(f"shape (256 px, {args.scar_draws} draws) | median width | 5th-95th pct of median | max width | median area")
    for name, (med, lo, hi, top, area) in scar_figures(args.scar_draws).items():
        print(f"{name} | {med:.1f} | {lo:.1f}-{hi:.1f} | {top:.1f} | {area:.0f}")


if __name__ == "__main__":
    main()
