"""Fine-tuning's learning curve as a figure: SSL accuracy per class, and the detectors' test metrics
per checkpoint, both against images seen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reb_dist.reporting.plots import save_figure


def learning_curve_plot(rows: Sequence[Mapping[str, Any]], ssl_metrics: Sequence[Mapping[str, Any]],
                        path: str | Path, title: str) -> Path:
    """Left: SSL accuracy (all classes and each class) per step; right: image AUROC (solid) and AUPRO
    (dashed) of each method per checkpoint. x = images seen. Written atomically; returns `path`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ssl_ax, det_ax = fig.subplots(1, 2)
    x = [m.get("images_seen", m["step"]) for m in ssl_metrics]
    per_class = sorted({k for m in ssl_metrics for k in m if k.startswith("accuracy/")})
    for key in per_class:
        ssl_ax.plot(x, [m.get(key, float("nan")) for m in ssl_metrics], lw=1, alpha=0.7,
                    label=key.removeprefix("accuracy/"))
    ssl_ax.plot(x, [m["accuracy"] for m in ssl_metrics], c="black", lw=2, label="all classes")
    ssl_ax.set_xlabel("images seen")
    ssl_ax.set_ylabel("SSL accuracy (training batches)")
    ssl_ax.set_ylim(0, 1)
    ssl_ax.grid(alpha=0.3)
    ssl_ax.legend(fontsize="x-small", ncol=2)
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        seen = [r["images_seen"] for r in mine]
        colour = f"C{i}"
        det_ax.plot(seen, [100 * r.get("image_auroc", float("nan")) for r in mine], "-o", c=colour, ms=4,
                    label=f"{method} image AUROC")
        det_ax.plot(seen, [100 * r.get("aupro", float("nan")) for r in mine], "--s", c=colour, ms=3,
                    label=f"{method} AUPRO")
    det_ax.set_xlabel("images seen (0: start weights)")
    det_ax.set_ylabel("test metric (%)")
    det_ax.grid(alpha=0.3)
    det_ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def confusion_windows(ssl_metrics: Sequence[Mapping[str, Any]], fraction: float = 0.25) -> list[dict]:
    """The SSL confusion matrix summed over the first and the last `fraction` of the steps recorded.

    Each step's record holds rank 0's matrix ("confusion", [true class][predicted class] counts).
    Returns [{"label", "first_step", "last_step", "counts"}], early window first; empty when no record
    has a matrix (runs from before it was recorded).
    """
    import numpy as np

    rows = [m for m in ssl_metrics if "confusion" in m]
    if not rows:
        return []
    n = max(1, round(len(rows) * fraction))
    windows = []
    for label, part in (("first", rows[:n]), ("last", rows[-n:])):
        counts = np.sum([np.asarray(m["confusion"], dtype=np.int64) for m in part], axis=0)
        windows.append({"label": f"{label} {len(part)} steps ({part[0]['step']}-{part[-1]['step']})",
                        "first_step": int(part[0]["step"]), "last_step": int(part[-1]["step"]),
                        "counts": counts.tolist()})
    return windows


def confusion_plot(windows: Sequence[Mapping[str, Any]], class_names: Sequence[str], path: str | Path,
                   title: str) -> Path:
    """One heat map per window: row = true class, column = predicted, each row normalised to 1 (so the
    diagonal is the class's accuracy), cells annotated. Written atomically; returns `path`."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(windows) + 0.6, 5.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(windows)))
    for ax, window in zip(axes, windows):
        counts = np.asarray(window["counts"], dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for (i, j), value in np.ndenumerate(share):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.6 else "black")
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(ticks, class_names, fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{window['label']}, {int(counts.sum())} samples", fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the true class")
    fig.suptitle(title)
    return save_figure(fig, path, dpi=100)
