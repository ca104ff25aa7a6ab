"""DefectMaker: one normal image in, labelled synthetic-defect variants out, for REB's SSL task.

REB fine-tunes an ImageNet CNN on a 7-way classification: normal vs. six kinds of synthetic defect
(3 shapes x 2 fills, paper section 4.2), so the features adapt to industrial images before the memory
bank is built. This module is the pure core that Ray Data workers call: no global RNG, no torch, no
I/O except optional saliency maps. Every random choice comes from ``np.random.default_rng(seed)`` in a
fixed order, so the same (image, class_id, seed, source) gives byte-identical samples in any process
on any machine, and a training run can be replayed exactly from its seeds.

Order of random draws in ``make`` (changing it changes every sample; keep it):
  augmentation (brightness, contrast, saturation, dihedral k) -> centre -> blend coin ->
  shape [-> (centre -> shape) again while an object class's shape is under 95% on the object] ->
  (fill -> fill jitter -> fuse weight), repeated only when a fill left the image unchanged.
Where no object is found (textures, saliency "whole", the cutpaste task) nothing is redrawn, so those
samples are what they were before on-object placement existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reb_dist.core.defectmaker.fills import (
    JITTER_STRENGTH,
    apply_jitter,
    as_rgb,
    color_jitter,
    cut_paste,
    is_gray,
    jitter_factors,
    random_noise,
    resize,
    to_gray,
)
from reb_dist.core.defectmaker.fusing import BLUR_RADIUS, BLUR_SIGMA, ERODE_RADIUS, composite, soften
from reb_dist.core.defectmaker.placement import object_core, object_mask, on_object_fraction, place_on_object
from reb_dist.core.defectmaker.saliency import (
    DEFAULT_THRESHOLD,
    load_saliency_folder,
    resize_map,
    sample_centre,
    saliency_region,
    spectral_residual_saliency,
)
from reb_dist.core.defectmaker.shapes import MIN_PIXELS, SHAPES, Centre, size_scale


@dataclass(frozen=True)
class DefectClass:
    """One class of the SSL task: a shape and a fill, or neither for the normal class."""

    name: str
    shape: str | None
    fill: str | None


NORMAL = DefectClass("normal", None, None)


def _cls(shape: str, fill: str) -> DefectClass:
    return DefectClass(f"{shape}+{fill}", shape, fill)


# The class order is part of the trained model's head: never reorder, only append new tasks.
TASKS: dict[str, tuple[DefectClass, ...]] = {
    # REB's 7-way task: 0 normal, then shape-major {bezier, bezier_scar, bezier_clump} x {cut_paste, noise}
    "defectmaker": (NORMAL,
                    _cls("bezier", "cut_paste"), _cls("bezier", "noise"),
                    _cls("bezier_scar", "cut_paste"), _cls("bezier_scar", "noise"),
                    _cls("bezier_clump", "cut_paste"), _cls("bezier_clump", "noise")),
    # CutPaste's 3-way baseline (REB Table 5): rectangle and rectangle-scar, cut-paste fill, pasted anywhere
    "cutpaste": (NORMAL, _cls("rectangle", "cut_paste"), _cls("rectangle_scar", "cut_paste")),
    # DefectMaker with the random-noise fill only (REB Table 5, "Random Noise" row)
    "noise": (NORMAL, _cls("bezier", "noise"), _cls("bezier_scar", "noise"), _cls("bezier_clump", "noise")),
}

CLUMP_WEIGHT_RANGE = (0.5, 1.0)  # METHOD-NOTES: Bezier-clump is fused with w ~ U(0.5, 1)
SOLID_WEIGHT_RANGE = (1.0, 1.0)  # the authors' code: w = 1 for the other shapes
FILL_TRIES = 4  # draws of a fill before an invisible cut-paste defect falls back to noise


@dataclass(eq=False)
class DefectSample:
    """One training example: uint8 HxWx3 image, float32 HxW mask in [0, 1] (soft when blended, zeros for
    normal), the class id, and how it was made (shape, fill, fusing, centre, weight, augmentation, seed)."""

    image: np.ndarray
    mask: np.ndarray
    class_id: int
    meta: dict[str, Any] = field(default_factory=dict)


def derive_seed(seed: int, class_id: int) -> int:
    """The per-class seed sample_all uses: SeedSequence([seed, class_id]) hashed to a 64-bit int.

    SeedSequence's hash is specified by numpy, so the same pair gives the same seed everywhere, and
    the seven variants of one image draw independent streams.
    """
    a, b = np.random.SeedSequence([int(seed), int(class_id)]).generate_state(2, np.uint32)
    return (int(a) << 32) | int(b)


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """Apply element k (0..7) of the dihedral group to the first two axes of `array`.

    Transposes if k & 4, then rotates by 90 degrees (k & 3) times.

    Returns:
        The transformed array, C-contiguous.

    Raises:
        ValueError: If `k` is outside 0..7.
    """
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    if k & 4:
        array = np.swapaxes(array, 0, 1)
    return np.ascontiguousarray(np.rot90(array, k & 3))


def fuse_radii(height: int, width: int) -> tuple[int, float, int]:
    """(erode radius, blur sigma, blur radius) for blending, scaled from their 256-px values."""
    s = size_scale(height, width)
    return max(1, int(round(ERODE_RADIUS * s))), BLUR_SIGMA * s, max(1, int(math.ceil(BLUR_RADIUS * s)))


def synthesize(rng: np.random.Generator, image: np.ndarray, shape: str, fill: str, fusing: str, centre: Centre,
               source_image: np.ndarray | None = None,
               weight_range: tuple[float, float] = SOLID_WEIGHT_RANGE,
               gray: bool = False, hard: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw one defect into a uint8 HxWx3 image: (image with defect, float32 mask, meta).

    shape: a key of SHAPES; fill: "noise" or "cut_paste" (from `source_image`, or from the image itself
    when None, as the original CutPaste does); fusing: "paste" (mask = hard shape) or "blend" (mask = soft
    shape). The fill is drawn only over the shape's bounding box (grown by the blur radius for blending),
    then colour-jittered; with `gray` it is turned grey, so a grey image's defect cannot be found by colour.
    Draws from `rng`: shape, then per fill attempt: fill, jitter, fuse weight w ~ U(weight_range).
    `hard`: the bool shape already drawn around `centre` (DefectMaker's on-object placement); then no
    shape is drawn here.

    Returns:
        The uint8 image with the defect, the float32 HxW mask in [0, 1], and meta (shape, fill,
        fusing, weight, centre, bbox, fill_source, fill_tries).

    Raises:
        ValueError: If `shape`, `fill` or `fusing` is unknown.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    if fill not in ("noise", "cut_paste"):
        raise ValueError(f"unknown fill {fill!r}; expected 'noise' or 'cut_paste'")
    if fusing not in ("paste", "blend"):
        raise ValueError(f"unknown fusing {fusing!r}; expected 'paste' or 'blend'")
    h, w = image.shape[:2]
    erode_r, sigma, blur_r = fuse_radii(h, w)
    hard = SHAPES[shape](rng, h, w, centre) if hard is None else np.asarray(hard, dtype=bool)
    ys, xs = np.nonzero(hard)
    margin = blur_r if fusing == "blend" else 0
    y0, y1 = max(0, int(ys.min()) - margin), min(h, int(ys.max()) + 1 + margin)
    x0, x1 = max(0, int(xs.min()) - margin), min(w, int(xs.max()) + 1 + margin)
    if fusing == "blend":
        mask = soften(hard, erode_r, sigma, blur_r)
    else:
        mask = hard.astype(np.float32)
    # A fill can be invisible: a crop of white background pasted onto white background. Such a sample
    # would be a "defect" without a defect, i.e. a wrong label, so the fill is redrawn a few times and,
    # for cut-paste, finally replaced by noise (meta["fill_source"] says so).
    need = min(MIN_PIXELS, int(hard.sum()))
    plan = [fill] * FILL_TRIES + (["noise"] if fill == "cut_paste" else [])
    for tries, kind in enumerate(plan, start=1):
        if kind == "noise":
            patch = random_noise(rng, y1 - y0, x1 - x0)
        else:
            patch = cut_paste(rng, image if source_image is None else source_image, y1 - y0, x1 - x0)
        patch = color_jitter(rng, patch, JITTER_STRENGTH)
        if gray:
            patch = to_gray(patch)
        canvas = image.copy()
        canvas[y0:y1, x0:x1] = patch
        weight = float(rng.uniform(weight_range[0], weight_range[1]))
        out = composite(image, canvas, mask.astype(np.float64) * weight)
        if int((out != image).any(axis=2).sum()) >= need:
            break
    if fill == "noise":
        fill_source = "noise"
    elif kind == "noise":
        fill_source = "noise-fallback"
    else:
        fill_source = "self" if source_image is None else "source"
    meta = {"shape": shape, "fill": fill, "fusing": fusing, "weight": weight,
            "centre": (int(centre[0]), int(centre[1])), "bbox": (y0, y1, x0, x1),
            "fill_source": fill_source, "fill_tries": tries}
    return out, mask, meta


class DefectMaker:
    """Makes the labelled variants of REB's SSL task from normal images.

    task: "defectmaker" (7 classes), "cutpaste" (3) or "noise" (4); see TASKS for the class order.
    image_size: side of the square working size images (and sources, maps) are resized to first
        (bicubic), so a batch is uniform; None keeps each image's own size. Pixel sizes (scar widths,
        blur radii) scale with the working size.
    blend_prob: probability of soft blending instead of pasting (the cutpaste task always pastes).
    saliency: where defects are centred: "spectral" (the unsupervised estimate of saliency.py),
        "whole" (anywhere; for textures), or a folder of precomputed maps matched by image stem (pass
        `image_path` to make); an image without a map there falls back to "spectral", and
        meta["saliency"] says which was used. The cutpaste task centres anywhere, as CutPaste does.
        Object classes also keep each defect's area at least 95% on the object (placement.py): the
        object is the given or folder map thresholded, or for "spectral" placement.object_mask, which
        finds no object on textures (the frame is not a plain background), so they are unaffected.
    augmentation: jitter (0.1) and one of the 8 flips/rotations of the base image before the defect,
        as the authors train; note that with image_size=None a transpose swaps a non-square H and W.
    keep_gray: give grey images grey fills.
    saliency_threshold: saliency a pixel needs (sal >= threshold) to be a defect centre.
    jitter: strength of the augmentation's colour jitter.

    Raises:
        ValueError: If task, image_size, blend_prob or saliency is invalid.
    """

    def __init__(self, task: str = "defectmaker", image_size: int | None = 256, blend_prob: float = 0.5,
                 saliency: str | Path = "spectral", saliency_threshold: float = DEFAULT_THRESHOLD,
                 augmentation: bool = True, jitter: float = JITTER_STRENGTH, keep_gray: bool = True):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
        if image_size is not None and int(image_size) < 8:
            raise ValueError(f"image_size must be at least 8 or None, got {image_size}")
        if not 0.0 <= blend_prob <= 1.0:
            raise ValueError(f"blend_prob must be in [0, 1], got {blend_prob}")
        if isinstance(saliency, Path) or saliency not in ("spectral", "whole"):
            if not Path(saliency).is_dir():
                raise ValueError(f"saliency must be 'spectral', 'whole' or an existing folder, got {saliency!r}")
            saliency = Path(saliency)
        self.task = task
        self.class_specs = TASKS[task]
        self.image_size = None if image_size is None else int(image_size)
        self.blend_prob = float(blend_prob)
        self.saliency = saliency
        self.saliency_threshold = float(saliency_threshold)
        self.augmentation = bool(augmentation)
        self.jitter = float(jitter)
        self.keep_gray = bool(keep_gray)

    @property
    def classes(self) -> list[str]:
        """Class names in label order, e.g. ["normal", "bezier+cut_paste", ...]."""
        return [c.name for c in self.class_specs]

    @property
    def num_classes(self) -> int:
        """Number of classes of the task, normal included."""
        return len(self.class_specs)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Return `image` as uint8 HxWx3 at the working size (grey replicated, alpha dropped)."""
        rgb = as_rgb(image)
        if self.image_size is not None:
            rgb = resize(rgb, self.image_size, self.image_size)
        return rgb

    def augment(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """Return `image` colour-jittered (brightness, contrast, saturation), then randomly flipped/rotated.

        Both are drawn from `rng`.
        """
        image, _, _ = self._augment(rng, as_rgb(image))
        return image

    def _augment(self, rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, tuple[float, ...], int]:
        factors = jitter_factors(rng, self.jitter)
        k = int(rng.integers(0, 8))
        return dihedral(apply_jitter(image, factors), k), factors, k

    def saliency_for(self, image: np.ndarray, saliency_map: np.ndarray | None = None,
                     image_path: str | Path | None = None) -> tuple[np.ndarray | None, str]:
        """(map at the working size of `image` or None for "anywhere", where it came from).

        Precedence: an explicit map ("given"), "whole", a folder map ("folder"), else the spectral
        estimate ("spectral", or "spectral-fallback" when a folder had no map for this image).
        """
        base = self.prepare(image)
        h, w = base.shape[:2]
        if self.task == "cutpaste":
            return None, "whole"
        if saliency_map is not None:
            return resize_map(saliency_map, h, w), "given"
        if self.saliency == "whole":
            return None, "whole"
        if isinstance(self.saliency, Path):
            sal = None if image_path is None else load_saliency_folder(self.saliency, image_path, size=(h, w))
            if sal is not None:
                return sal, "folder"
            return spectral_residual_saliency(base), "spectral-fallback"
        return spectral_residual_saliency(base), "spectral"

    def object_for(self, image: np.ndarray, sal: np.ndarray | None, origin: str) -> np.ndarray | None:
        """bool mask at the working size of `image` where defects must lie, for `saliency_for`'s (map,
        origin), or None when they may lie anywhere (no map, a texture, a salient region too small to
        trust). A given or folder map is taken as it is; the spectral case's estimated object keeps a
        2 px (at 256) margin inside its outline, for the estimate's own error."""
        if sal is None:
            return None
        if origin in ("given", "folder"):
            obj = saliency_region(sal, self.saliency_threshold)
            return None if obj.all() else obj
        obj = object_mask(self.prepare(image))
        return None if obj.all() else object_core(obj)

    def make(self, image: np.ndarray, class_id: int, seed: int, source_image: np.ndarray | None = None,
             saliency_map: np.ndarray | None = None, image_path: str | Path | None = None) -> DefectSample:
        """The `class_id` variant of `image`, deterministic in (image, class_id, seed, source, map).

        source_image: another normal image of the class for the cut-paste fill (None: the image itself).
        saliency_map: a map for `image` (any size, [0, 1]); image_path: for looking a map up in a folder.

        Returns:
            The `DefectSample` at the working size; class 0 gives the (augmented) image and a zero mask.

        Raises:
            ValueError: If `class_id` is out of range or `seed` is not a non-negative int.
        """
        return self._make(image, class_id, seed, source_image, saliency_map, image_path, None)

    def sample_all(self, image: np.ndarray, seed: int, source_image: np.ndarray | None = None,
                   saliency_map: np.ndarray | None = None,
                   image_path: str | Path | None = None) -> list[DefectSample]:
        """One sample per class (ids 0..n-1), class c with seed derive_seed(seed, c); saliency computed once.

        Identical to calling make(image, c, derive_seed(seed, c), ...) for each c.

        Returns:
            The `num_classes` samples, in class order.
        """
        resolved = None
        if self.num_classes > 1:
            sal, origin = self.saliency_for(image, saliency_map, image_path)
            resolved = (sal, origin, self.object_for(image, sal, origin))
        return [self._make(image, c, derive_seed(seed, c), source_image, saliency_map, image_path, resolved)
                for c in range(self.num_classes)]

    def _make(self, image: np.ndarray, class_id: int, seed: int, source_image: np.ndarray | None,
              saliency_map: np.ndarray | None, image_path: str | Path | None,
              resolved: tuple[np.ndarray | None, str, np.ndarray | None] | None) -> DefectSample:
        if not 0 <= int(class_id) < self.num_classes:
            raise ValueError(f"class_id must be in 0..{self.num_classes - 1} for task {self.task!r}, got {class_id}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        class_id, seed = int(class_id), int(seed)
        spec = self.class_specs[class_id]
        gray = self.keep_gray and is_gray(image)
        base = self.prepare(image)
        rng = np.random.default_rng(seed)
        factors: tuple[float, ...] | None = None
        k = 0
        work = base
        if self.augmentation:
            work, factors, k = self._augment(rng, base)
        meta: dict[str, Any] = {"task": self.task, "class_name": spec.name, "seed": seed, "dihedral": k,
                                "jitter": factors, "shape": None, "fill": None, "fusing": None,
                                "weight": None, "centre": None, "bbox": None, "saliency": None,
                                "on_object": None, "placement_tries": None, "placement_cut": None}
        h, w = work.shape[:2]
        if spec.shape is None:
            return DefectSample(work, np.zeros((h, w), dtype=np.float32), class_id, meta)

        if resolved is None:
            sal, origin = self.saliency_for(image, saliency_map, image_path)
            resolved = (sal, origin, self.object_for(image, sal, origin))
        sal, origin, obj = resolved
        region = saliency_region(None if sal is None else dihedral(sal, k), self.saliency_threshold,
                                 shape=(h, w))
        if obj is not None:
            obj = dihedral(obj, k)
            on = region & obj  # centres on the object (the spectral map's rim blur spills off it)
            region = on if on.any() else obj
        centre = sample_centre(rng, region)
        blend_coin = float(rng.uniform())
        fusing = "blend" if (self.task != "cutpaste" and blend_coin < self.blend_prob) else "paste"
        source = None
        if source_image is not None:
            source = resize(as_rgb(source_image), base.shape[0], base.shape[1])
        weight_range = CLUMP_WEIGHT_RANGE if spec.shape == "bezier_clump" else SOLID_WEIGHT_RANGE
        hard, tries, cut = None, None, None
        if obj is not None:
            hard, centre, tries, cut = place_on_object(rng, SHAPES[spec.shape], obj, region, centre)
        out, mask, defect_meta = synthesize(rng, work, spec.shape, spec.fill, fusing, centre, source,
                                            weight_range, gray, hard)
        meta.update(defect_meta)
        meta["saliency"] = origin
        meta["placement_tries"] = tries  # shapes drawn to fit the object (None: no object, drawn once)
        meta["placement_cut"] = cut  # True when no shape fitted and the last was cut to the object
        meta["on_object"] = None if obj is None else on_object_fraction(mask, obj)
        return DefectSample(out, mask, class_id, meta)
