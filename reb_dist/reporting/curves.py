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
