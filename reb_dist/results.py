"""What runs produce: a method's and a category's test-set results, one image's prediction.

Plain dataclasses in a low module, so the pipelines that make them and the reporting that writes
them both import them from below (reporting sits under the pipelines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from reb_dist.core.ldknn import ScoringMethod
from reb_dist.io.data import ClassSplit

if TYPE_CHECKING:  # only for the annotation: results stays light to import
    from reb_dist.core.detector import NearestPatch


@dataclass
class MethodResult:
    """One method's test-set result: metrics, image scores and a few pixel maps for galleries."""

    method: ScoringMethod
    metrics: dict[str, float]
    image_scores: np.ndarray
    examples: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (test index, pixel map)


@dataclass
class CategoryResult:
    """Every method's result on one category's test set, with what it cost."""

    category: str
    split: ClassSplit
    labels: np.ndarray
    defect_types: list[str]
    methods: list[MethodResult]
    timings: dict[str, float]
    bank_size: int
    feature_dim: int
    image_size: int = 256
    variant: str = ""  # "" for the configured weights, "defectmaker" for the fine-tuned ones
    # what the bank's searches computed (Detector.search_mode): "exact", "faithful" or
    # "coreset-densities"; every result row carries it, so figures of different modes never mix
    search_mode: str = "exact"

    def label(self, method: ScoringMethod) -> str:
        """The method's name in tables: prefixed by the variant ("defectmaker+knn(k=9)")."""
        return f"{self.variant}+{method.label}" if self.variant else method.label


@dataclass
class Prediction:
    """One image's prediction: its score and pixel map (at the detector's image size), and, when
    known, its normalised score and whether it is flagged anomalous.

    An image that could not be scored (unreadable, too small...) has `error` set, a NaN score and
    no image or pixel map.
    """

    path: Path | None  # None for an image given in memory (an array)
    image: np.ndarray | None  # the image as read, uint8 (H, W, 3); None when it could not be
    score: float
    pixel_map: np.ndarray | None  # (S, S) float32, S = the detector's image size; None on error
    # normalise(score, the model's calibration): 0..1, 0.5 at the calibrated threshold; None without one
    normalised_score: float | None = None
    # score >= the threshold used; None when there is none (no calibration and none given)
    anomalous: bool | None = None
    error: str | None = None  # why the image could not be scored; None when it was
    # the training patch nearest to the hottest patch (reb_dist.core.detector.NearestPatch); None when
    # the model does not record its bank's provenance, or for an exported model
    nearest: NearestPatch | None = None

    def input_map(self) -> np.ndarray | None:
        """The pixel map at the input image's resolution (H, W), float32: the (S, S) map resized back
        bilinearly, as the image was resized to S x S to be scored. None when it was not scored."""
        if self.pixel_map is None or self.image is None:
            return None
        from PIL import Image

        h, w = self.image.shape[:2]
        if self.pixel_map.shape == (h, w):
            return self.pixel_map.astype(np.float32, copy=False)
        resized = Image.fromarray(np.asarray(self.pixel_map, np.float32)).resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32)
