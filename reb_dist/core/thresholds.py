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

#: How `calibrate` picks the threshold ("auto": see `calibrate`).
METHODS = ("auto", "f1", "quantile")
#: With fewer validation normals than this, `Calibration.warning` says the false-positive rate is uncertain.
MIN_NORMALS = 20
#: The confidence of `Calibration.fpr_interval`.
CONFIDENCE = 0.95


def _number(value, what: str, low: float = -math.inf, high: float = math.inf, integer: bool = False) -> float | int:
    """`value` as a float (an int with `integer`) in [low, high], or a ValueError naming `what`."""
    kinds = (int, np.integer) if integer else (int, float, np.floating, np.integer)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a finite number"
        bounds = "" if (low, high) == (-math.inf, math.inf) else \
            f" >= {low:g}" if high == math.inf else f" in [{low:g}, {high:g}]"
        raise ValueError(f"{what} must be {kind}{bounds}, got {value!r}")
    return int(value) if integer else float(value)


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
        normals, anomalies: how many validation images of each label calibrated it (0: not recorded,
            as in models saved before these fields).
        normal_fpr: the share of those normal images flagged (score >= threshold): the expected
            false-positive rate on normal images (None: not recorded).
        fpr_interval: its exact (Clopper-Pearson) `CONFIDENCE` interval, (low, high): how far a
            rate measured on `normals` images can be trusted.
        reason: why method "auto" chose `method` (empty otherwise).
        f1: the F1 of flagging the validation images at `threshold` (None: not recorded).

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
    normals: int = 0
    anomalies: int = 0
    normal_fpr: float | None = None
    fpr_interval: tuple[float, float] | None = None
    reason: str = ""
    f1: float | None = None

    def __post_init__(self) -> None:
        # Checked here so a hand-built or loaded calibration can never make normalise() ill-defined.
        _check_method(self.method)
        for name in ("threshold", "low", "high"):
            self._set(name, _number(getattr(self, name), f"calibration {name}"))
        if not self.low <= self.threshold <= self.high:
            raise ValueError(f"calibration needs low <= threshold <= high, got "
                             f"{self.low} <= {self.threshold} <= {self.high}")
        if not isinstance(self.source, str):
            raise ValueError(f"calibration source must be a string, got {self.source!r}")
        if self.method == "quantile" and self.quantile is None:
            raise ValueError('calibration method "quantile" needs its quantile')
        if self.quantile is not None:
            self._set("quantile", _number(self.quantile, "calibration quantile", 0, 1))
        for name in ("normals", "anomalies"):
            self._set(name, _number(getattr(self, name), f"calibration {name}", 0, integer=True))
        for name in ("normal_fpr", "f1"):
            if getattr(self, name) is not None:
                self._set(name, _number(getattr(self, name), f"calibration {name}", 0, 1))
        if self.fpr_interval is not None:
            if not isinstance(self.fpr_interval, (tuple, list)) or len(self.fpr_interval) != 2:
                raise ValueError(f"calibration fpr_interval must be (low, high), got {self.fpr_interval!r}")
            self._set("fpr_interval", tuple(_number(r, "calibration fpr_interval", 0, 1) for r in self.fpr_interval))
        if not isinstance(self.reason, str):
            raise ValueError(f"calibration reason must be a string, got {self.reason!r}")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # a frozen dataclass normalising its own fields

    def describe(self) -> str:
        """One line for a log: the threshold, how it was taken, on how many images, and the expected
        false-positive rate on normal images with its interval, e.g. ``1.23 (quantile 0.99 of 27
        normal validation images; false positives on normal images 3.7%, 95% interval 0.1-19.0%)``."""
        how = f"quantile {self.quantile:g}" if self.method == "quantile" else "best F1"
        if self.normals:
            how += (f" of {self.normals} normal validation images" if self.method == "quantile" else
                    f" on {self.normals} normal and {self.anomalies} anomalous validation images")
        elif self.source:
            how += f" on {self.source}"
        if self.reason:
            how += f", {self.reason}"
        if self.normal_fpr is not None and self.fpr_interval is not None:
            lo, hi = self.fpr_interval
            how += (f"; false positives on normal images {100 * self.normal_fpr:.1f}%, {CONFIDENCE:.0%} interval "
                    f"{100 * lo:.1f}-{100 * hi:.1f}%")
        return f"{self.threshold:.6g} ({how})"

    def warning(self) -> str | None:
        """What a user should know before trusting the threshold, or None: too few normal images
        calibrated it (fewer than `MIN_NORMALS`), so its false-positive rate is only loosely known."""
        if not self.normals or self.normals >= MIN_NORMALS:
            return None
        interval = ""
        if self.fpr_interval is not None:
            lo, hi = self.fpr_interval
            interval = f" (anywhere in {100 * lo:.0f}-{100 * hi:.0f}% at {CONFIDENCE:.0%} confidence)"
        return (f"the image threshold was calibrated on only {self.normals} normal images, so its false-positive "
                f"rate on normal images is uncertain{interval}; hold out more (tune.fraction), calibrate on "
                f"more images, or give --threshold")

    def metrics(self) -> dict[str, float]:
        """The calibration as metrics for a tracker: threshold, image counts, validation F1 and the
        normal images' false-positive rate with its interval (what is recorded)."""
        out = {"threshold": self.threshold}
        if self.normals:
            out.update({"threshold_normals": self.normals, "threshold_anomalies": self.anomalies})
        if self.f1 is not None:
            out["threshold_validation_f1"] = self.f1
        if self.normal_fpr is not None:
            out["threshold_normal_fpr"] = self.normal_fpr
        if self.fpr_interval is not None:
            out["threshold_normal_fpr_low"], out["threshold_normal_fpr_high"] = self.fpr_interval
        return out

    def to_dict(self) -> dict:
        """Plain JSON-able values: every field by name (quantile None unless method "quantile")."""
        values = asdict(self)
        if self.fpr_interval is not None:
            values["fpr_interval"] = list(self.fpr_interval)
        return values

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
        optional = {"source", "quantile", "normals", "anomalies", "normal_fpr", "fpr_interval", "reason", "f1"}
        unknown = sorted(set(values) - set(required) - optional)
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


def fpr_interval(flagged: int, normals: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a false-positive rate seen as `flagged` of `normals`
    normal images: conservative, and honest where few images make the normal approximation wrong."""
    from scipy.stats import beta

    if normals <= 0 or not 0 <= flagged <= normals:
        raise ValueError(f"need 0 <= flagged <= normals and normals > 0, got {flagged} of {normals}")
    tail = (1 - confidence) / 2
    low = float(beta.ppf(tail, flagged, normals - flagged + 1)) if flagged > 0 else 0.0
    high = float(beta.ppf(1 - tail, flagged + 1, normals - flagged)) if flagged < normals else 1.0
    return low, high


def calibrate(labels: ArrayLike, scores: ArrayLike, method: str = "auto", quantile: float = 0.99,
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
            ``"auto"``: "quantile" when every anomaly scores above every normal and there are
            enough normals to estimate the quantile (at least ``1 / (1 - quantile)``), or when there
            are no anomalies; else "f1". Synthetic anomalies are often that easy, and then every
            threshold in the gap has F1 1: best F1 sits at the lowest synthetic anomaly's score,
            above all the normals, and may miss real defects subtler than the synthetic ones.
        quantile: the quantile of method "quantile" (ignored by "f1").
        source: what the scores were computed on, kept in the calibration.

    Returns:
        The calibration; ``low`` and ``high`` are the lowest and highest of all `scores`
        (anomalies included, whatever the method); the counts of normal and anomalous images, and the
        share of normals flagged with its `CONFIDENCE` interval.

    Raises:
        ValueError: on an unknown method (naming the choices), a quantile outside [0, 1], labels
            not 0/1, NaN or infinite scores, or a class the method needs being absent.
    """
    _check_method(method)
    y, s = _labels_scores(labels, scores)
    normals, anomalies = s[~y], s[y]
    reason = ""
    if method == "auto":
        # a q-quantile is only estimated from at least 1 / (1 - q) normals (100 for 0.99); from fewer it
        # is the largest score or beyond it (bottle: 6 normals' 0.99 quantile flagged 12 of 20 good test
        # images, best F1 2; docs/RESULTS.md section 13)
        enough = normals.size * (1 - quantile) >= 1 - 1e-9
        if normals.size == 0:
            method = "f1"  # raises below, naming the missing class
        elif anomalies.size == 0:
            method, reason = "quantile", "auto: no validation anomalies"
        elif anomalies.min() > normals.max() and enough:
            method = "quantile"
            reason = ("auto: every validation anomaly scored above every normal, so best F1 would sit at the "
                      "easiest anomalies' edge")
        elif anomalies.min() > normals.max():
            method = "f1"
            reason = (f"auto: every validation anomaly scored above every normal, but {normals.size} normals are "
                      f"too few for their {quantile:g} quantile (it needs {math.ceil(1 / (1 - quantile) - 1e-9)})")
        else:
            method, reason = "f1", "auto: validation anomalies and normals overlap"
    if method == "f1":
        _, threshold = best_f1(y, s)  # raises when a class is missing
        q = None
    else:
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        if normals.size == 0:
            raise ValueError('threshold method "quantile" needs validation scores of normal images (label 0)')
        threshold, q = float(np.quantile(normals, quantile)), float(quantile)
    flagged = int(np.count_nonzero(normals >= threshold))
    return Calibration(threshold=float(threshold), method=method, low=float(s.min()), high=float(s.max()),
                       source=source, quantile=q, normals=int(normals.size), anomalies=int(anomalies.size),
                       normal_fpr=flagged / normals.size, fpr_interval=fpr_interval(flagged, normals.size),
                       reason=reason, f1=threshold_metrics(y, s, threshold)["f1"] if anomalies.size else None)


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


def threshold_counts(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, int]:
    """The confusion counts of flagging ``score >= threshold`` as anomalous (label 1).

    Raises:
        ValueError: if labels are not 0/1 or bool, lengths differ, or scores contain NaN.

    Returns:
        ``{"tp": ..., "fp": ..., "fn": ..., "tn": ...}``: anomalies flagged, normals flagged,
        anomalies missed, normals passed.
    """
    y, s = as_labels(labels), np.asarray(scores, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    reject_nan(s, "scores")
    flagged = s >= threshold
    return {"tp": int(np.count_nonzero(flagged & y)), "fp": int(np.count_nonzero(flagged & ~y)),
            "fn": int(np.count_nonzero(~flagged & y)), "tn": int(np.count_nonzero(~flagged & ~y))}


def threshold_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and false-positive rate of flagging ``score >= threshold`` as anomalous
    (label 1); `threshold_counts` gives the counts behind them.

    An undefined value (nothing flagged, no anomalies, no normals for the false-positive rate, or
    both zero for F1) is 0.0, without a warning.

    Raises:
        ValueError: if labels are not 0/1 or bool, lengths differ, or scores contain NaN.

    Returns:
        ``{"precision": ..., "recall": ..., "f1": ..., "fpr": ...}`` (fpr: the share of normal
        images flagged).
    """
    c = threshold_counts(labels, scores, threshold)
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    fpr = fp / (fp + c["tn"]) if fp + c["tn"] else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "fpr": float(fpr)}
