"""Validation splits for choosing K and alpha without looking at the images results are reported on.

Two kinds (the split is recorded with every result, as `ValidationSplit.record()`):
  synthetic  held-out normal training images (removed from the bank) plus DefectMaker anomalies
             made from them; needs no real defect at all. The default.
  test       a seeded, stratified part of the test set; reported metrics use the rest only.

Pure: numpy + the DefectMaker core, no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reb_dist.io.data import ClassSplit
from reb_dist.io.data.images import read_image
from reb_dist.io.data.samples import Sample
from reb_dist.core.defectmaker import DefectMaker
from reb_dist.names import VALIDATION_KINDS

KINDS = VALIDATION_KINDS  # named below config (reb_dist.names), read here


@dataclass
class ValidationSet:
    """In-memory validation images (uint8 HxWx3 at the working size), masks (HxW 0/1) and labels."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    labels: np.ndarray
    names: list[str]  # where each came from, e.g. "train/good/004.png" or "...+bezier+noise"


@dataclass
class ValidationSplit:
    """Which images build the bank, which are reported on, and which choose K and alpha.

    `kind` is "synthetic" or "test"; `held_out` lists the training images a synthetic split
    removed from the bank (empty for "test").
    """

    kind: str
    seed: int
    train: list[Sample]  # the bank's images
    test: list[Sample]  # the images results are reported on
    validation: ValidationSet | list[Sample]  # synthetic: in memory; test: samples read like the test set
    held_out: list[Sample] = field(default_factory=list)

    def record(self) -> dict:
        """Return what was used for what, by file name, for the results file and MLflow.

        Returns:
            A dict with ``kind``, ``seed``, ``validation`` (names or paths), ``held_out_train`` and
            ``reported_test`` (paths), and ``train`` (the number of bank images).
        """
        val = (self.validation.names if isinstance(self.validation, ValidationSet)
               else [str(s.image_path) for s in self.validation])
        return {"kind": self.kind, "seed": self.seed, "validation": val,
                "held_out_train": [str(s.image_path) for s in self.held_out],
                "train": len(self.train), "reported_test": [str(s.image_path) for s in self.test]}


def _check_fraction(fraction: float, what: str) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{what} must be between 0 and 1, got {fraction}")


def synthetic_split(split: ClassSplit, fraction: float = 0.1, seed: int = 0, image_size: int = 256,
                    saliency: str = "spectral", minimum: int = 4) -> ValidationSplit:
    """Hold out `fraction` of the training images (at least `minimum`); each gives one normal and one
    DefectMaker anomaly (a random defect class, no colour jitter or flips: only the defect differs).

    Args:
        split: The class's train and test samples.
        fraction: Part of the training images held out, in (0, 1).
        seed: Seeds the choice of images, defect classes and defects.
        image_size: Working size of the validation images.
        saliency: DefectMaker saliency method for placing defects.
        minimum: Fewest images held out (at most all but one).

    Returns:
        A "synthetic" `ValidationSplit` whose validation is an in-memory `ValidationSet`.

    Raises:
        ValueError: If `fraction` is not in (0, 1) or there are too few training images.
    """
    _check_fraction(fraction, "the held-out fraction of training images")
    n = len(split.train)
    count = min(n - 1, max(minimum, round(fraction * n)))
    if count < 1:
        raise ValueError(f"{split.root}: {n} training image(s) are too few to hold any out for validation")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(n, size=count, replace=False).tolist())
    held_out = [s for i, s in enumerate(split.train) if i in held]
    train = [s for i, s in enumerate(split.train) if i not in held]

    maker = DefectMaker(image_size=image_size, saliency=saliency, augmentation=False)
    defect_classes = range(1, maker.num_classes)
    images, masks, labels, names = [], [], [], []
    for j, sample in enumerate(held_out):
        image = read_image(sample.image_path)
        normal = maker.prepare(image)
        images.append(normal)
        masks.append(np.zeros(normal.shape[:2], np.uint8))
        labels.append(0)
        names.append(str(sample.image_path))
        source = read_image(held_out[(j + 1) % len(held_out)].image_path)  # cut-paste from another image
        class_id = int(rng.choice(list(defect_classes)))
        made = maker.make(image, class_id, seed=int(rng.integers(2**63)), source_image=source,
                          image_path=sample.image_path)
        images.append(made.image)
        masks.append((made.mask > 0.5).astype(np.uint8))
        labels.append(1)
        names.append(f"{sample.image_path}+{maker.classes[class_id]}")
    return ValidationSplit("synthetic", seed, train, list(split.test),
                           ValidationSet(images, masks, np.array(labels), names), held_out)


def holdout_test_split(split: ClassSplit, fraction: float = 0.3, seed: int = 0) -> ValidationSplit:
    """Split off a seeded part of the test set, stratified by defect type, for validation; report the rest.

    Returns:
        A "test" `ValidationSplit` whose validation is a list of test samples.

    Raises:
        ValueError: If `fraction` is not in (0, 1) or either part ends up with only one label.
    """
    _check_fraction(fraction, "the validation fraction of the test set")
    rng = np.random.default_rng(seed)
    val_ids: set[int] = set()
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(split.test):
        by_type.setdefault(s.defect_type, []).append(i)
    for ids in by_type.values():
        take = round(fraction * len(ids))
        val_ids.update(rng.choice(ids, size=take, replace=False).tolist())
    validation = [s for i, s in enumerate(split.test) if i in val_ids]
    reported = [s for i, s in enumerate(split.test) if i not in val_ids]
    for part, name in ((validation, "validation"), (reported, "reported test")):
        if len({s.label for s in part}) < 2:
            raise ValueError(f"{split.root}: the {name} part of a {fraction:g} split has only one class; "
                             "change the fraction or use the synthetic validation split")
    return ValidationSplit("test", seed, list(split.train), reported, validation)


def make_split(split: ClassSplit, kind: str, fraction: float | None = None, seed: int = 0,
               image_size: int = 256, saliency: str = "spectral") -> ValidationSplit:
    """Make a validation split of `kind` ("synthetic" or "test").

    Args:
        split: The class's train and test samples.
        kind: "synthetic" (`synthetic_split`) or "test" (`holdout_test_split`).
        fraction: Held-out fraction; None uses 0.1 for synthetic and 0.3 for test.
        seed: Random seed of the split.
        image_size: Working image size (synthetic only).
        saliency: DefectMaker saliency method (synthetic only).

    Returns:
        The `ValidationSplit`.

    Raises:
        ValueError: If `kind` is unknown, or as the chosen split function raises.
    """
    if kind == "synthetic":
        return synthetic_split(split, 0.1 if fraction is None else fraction, seed, image_size, saliency)
    if kind == "test":
        return holdout_test_split(split, 0.3 if fraction is None else fraction, seed)
    raise ValueError(f"unknown validation split {kind!r}; use one of {KINDS}")
