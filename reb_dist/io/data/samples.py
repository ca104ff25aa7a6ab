"""What a dataset layout produces: lists of samples, independent of how files are arranged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NORMAL = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    label: 0 normal, 1 anomalous. defect_type: "good" for normal images, else the defect folder name.
    mask_path: ground-truth mask, None for normal images (all zero) or anomalous images without one.
    group: a coarser grouping reported apart (MVTec LOCO: "structural" / "logical"), "" otherwise.
    """

    image_path: Path
    label: int
    defect_type: str = NORMAL
    mask_path: Path | None = None
    group: str = ""


@dataclass
class ClassSplit:
    """The train (normal only) and test samples of one category."""

    name: str
    root: Path
    train: list[Sample]
    test: list[Sample]
    layout: str = "mvtec"
    extras: dict = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        """Whether any anomalous test sample has a ground-truth mask."""
        return any(s.mask_path is not None for s in self.test if s.label == 1)

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect types of the anomalous test samples."""
        return sorted({s.defect_type for s in self.test if s.label == 1})
