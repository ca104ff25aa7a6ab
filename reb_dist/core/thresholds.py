"""Image thresholds and score normalisation, calibrated on a validation split.

A `Calibration` is what a detector needs to flag images and draw maps on a fixed scale: the image
threshold (an image whose score is ``>= threshold`` is anomalous, the convention of
`reb_dist.core.metrics`) and the validation score range used by `normalise`.

Pure numpy on purpose, like the rest of `reb_dist.core`: saving a calibration in a model file is
`reb_dist.io.model_file`'s job (through `Calibration.to_dict` / `Calibration.from_dict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from reb_dist.core.metrics import ArrayLike, as_labels, reject_nan, best_f1

#: How `calibrate` picks the threshold.
METHODS = ("f1", "quantile")


@dataclass(frozen=True)
class Calibration:
    """An image threshold and the score range `normalise` stretches, from a validation split.

    Attributes:
        threshold: an image whose score is ``>= threshold`` is flagged anomalous.
        method: ``"f1"`` (the F1-optimal threshold on validation normals vs anomalies) or
            ``"quantile"`` (a quantile of the validation normals' scores).
        low: the score `normalise` maps to 0 (the lowest validation score).
        high: the score `normalise` maps to 1 (the highest validation score).
        source: what it was computed on, e.g. ``"synthetic validation: 21 normal, 21 anomalous"``.
        quantile: the quantile, for method ``"quantile"`` (None otherwise).

    Raises:
        ValueError: on an unknown method, a non-finite value, ``low <= threshold <= high`` not
            holding, or a quantile outside [0, 1] (or missing for method "quantile").
    """

    threshold: float
    method: str
    low: float
    high: float
    source: str = ""
    quantile: float | None = None

    def __post_init__(self) -> None:
        # Checked here so a hand-built or loaded calibration can never make normalise() ill-defined.
        _check_method(self.method)
        for name in ("threshold", "low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value):
                raise ValueError(f"calibration {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.low <= self.threshold <= self.high:
            raise ValueError(f"calibration needs low <= threshold <= high, got "
                             f"{self.low} <= {self.threshold} <= {self.high}")
        if not isinstance(self.source, str):
            raise ValueError(f"calibration source must be a string, got {self.source!r}")
        if self.method == "quantile" and self.quantile is None:
            raise ValueError('calibration method "quantile" needs its quantile')
        if self.quantile is not None:
            q = self.quantile
            if isinstance(q, bool) or not isinstance(q, (int, float, np.floating, np.integer)) or not 0 <= q <= 1:
                raise ValueError(f"calibration quantile must be a number in [0, 1], got {q!r}")
            object.__setattr__(self, "quantile", float(q))

    def to_dict(self) -> dict:
        """Plain JSON-able values: every field by name (quantile None unless method "quantile")."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Calibration:
        """The calibration `to_dict` wrote.

        Raises:
            ValueError: naming the problem, when `values` is not a dict, lacks threshold, method,
                low or high, has unknown keys, or has bad values (see the class).
        """
        if not isinstance(values, dict):
            raise ValueError(f"calibration must be a dict, got {type(values).__name__}")
        required = ("threshold", "method", "low", "high")
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"calibration lacks {', '.join(missing)} (has {sorted(values)})")
        unknown = sorted(set(values) - set(required) - {"source", "quantile"})
        if unknown:
            raise ValueError(f"calibration has unknown keys {unknown}")
        return cls(**values)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown threshold method {method!r}: choose one of {', '.join(METHODS)}")


def _labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = as_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    reject_nan(s, "scores")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite to calibrate on them")  # low/high would be inf
    return y, s


def calibrate(labels: ArrayLike, scores: ArrayLike, method: str = "f1", quantile: float = 0.99,
              source: str = "") -> Calibration:
    """The threshold and normalisation range of validation image scores.

    Args:
        labels: one per image, 1 / True = anomalous, 0 / False = normal.
        scores: one image score per image, higher = more anomalous.
        method: ``"f1"``: the threshold of best F1 (`reb_dist.core.metrics.best_f1`; always one of
            the scores, the highest among equal F1), which needs normals and anomalies.
            ``"quantile"``: ``np.quantile`` (linear interpolation) of the normal images' scores at
            `quantile`; anomalies are ignored for the threshold (useful when validation anomalies
            are synthetic), so a split of normals only is enough.
        quantile: the quantile of method "quantile" (ignored by "f1").
        source: what the scores were computed on, kept in the calibration.

    Returns:
        The calibration; ``low`` and ``high`` are the lowest and highest of all `scores`
        (anomalies included, whatever the method).

    Raises:
        ValueError: on an unknown method (naming the choices), a quantile outside [0, 1], labels
            not 0/1, NaN or infinite scores, or a class the method needs being absent.
    """
    _check_method(method)
    y, s = _labels_scores(labels, scores)
    if method == "f1":
        _, threshold = best_f1(y, s)  # raises when a class is missing
        q = None
    else:
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        normals = s[~y]
        if normals.size == 0:
            raise ValueError('threshold method "quantile" needs validation scores of normal images (label 0)')
        threshold, q = float(np.quantile(normals, quantile)), float(quantile)
    return Calibration(threshold=float(threshold), method=method, low=float(s.min()), high=float(s.max()),
                       source=source, quantile=q)


def normalise(scores: ArrayLike, calibration: Calibration) -> np.ndarray:
    """Scores (image scores or pixel maps of any shape) mapped to [0, 1] around the threshold.

    anomalib's convention that the threshold sits at 0.5, with each side stretched on its own
    (piecewise linear): ``low -> 0``, ``threshold -> 0.5``, ``high -> 1``, i.e.

    - ``x < threshold``:  ``0.5 * (x - low) / (threshold - low)``
    - ``x >= threshold``: ``0.5 + 0.5 * (x - threshold) / (high - threshold)``

    then clipped to [0, 1]. (anomalib itself shifts by ``(x - threshold) / (high - low)``, which
    reaches 0 and 1 only when the threshold is midway.) A side of zero width maps to its end: with
    ``threshold == low`` every score below is 0, with ``threshold == high`` every score above is
    1. Hence ``normalise(x) >= 0.5`` exactly when ``x >= threshold``: a score just below the
    threshold never rounds up to 0.5.

    Returns:
        float64 array of the shape of `scores`; NaN stays NaN.
    """
    x = np.asarray(scores, dtype=np.float64)
    t, lo_span, hi_span = calibration.threshold, calibration.threshold - calibration.low, \
        calibration.high - calibration.threshold
    below = 0.5 * (x - calibration.low) / lo_span if lo_span > 0 else np.zeros_like(x)
    above = 0.5 + 0.5 * (x - t) / hi_span if hi_span > 0 else np.where(x > t, 1.0, 0.5)
    out = np.where(x < t, np.minimum(below, np.nextafter(0.5, 0.0)), above)
    return np.clip(out, 0.0, 1.0)


def threshold_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of flagging ``score >= threshold`` as anomalous (label 1).

    An undefined value (nothing flagged, no anomalies, or both zero for F1) is 0.0, without a
    warning.

    Raises:
        ValueError: if labels are not 0/1 or bool, lengths differ, or scores contain NaN.

    Returns:
        ``{"precision": ..., "recall": ..., "f1": ...}``.
    """
    y, s = as_labels(labels), np.asarray(scores, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    reject_nan(s, "scores")
    flagged = s >= threshold
    tp = int(np.count_nonzero(flagged & y))
    fp = int(np.count_nonzero(flagged & ~y))
    fn = int(np.count_nonzero(~flagged & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
