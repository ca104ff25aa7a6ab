"""A comparison report built from an MLflow store: what every command and sweep logged, side by side.

Result runs (tagged `category` and `method`; benchmark, tune and sweep runs all are) become one
table row each, keyed by backbone, weights and search mode; the newest run wins where a (category,
backbone, weights, method, mode) was measured more than once, so a coreset-densities run never hides
the exact figures of its class. An approximate row shows the recall of its searches against exact.
Tune trial runs (tag kind=trial, params k and alpha) become a K/alpha scatter per class, and a
class's multi-objective tune search (its pareto_<class>.json) its Pareto plot. Written: report.md, report.csv, auroc_by_class.png, k_alpha_<class>.png,
pareto_<class>.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reb_dist.io.atomic import write_text_atomic
from reb_dist.io.tracking import REPORT_METRICS as METRICS
from reb_dist.io.tracking import REPORT_RECALLS as RECALLS
from reb_dist.io.tracking import collect_results
from reb_dist.reporting.plots import pareto_plot, save_figure
from reb_dist.reporting.tables import mode_footnote, to_csv

__all__ = ["collect_results", "write_report"]


def write_report(rows: list[dict], trials: list[dict], out: str | Path) -> list[Path]:
    """report.md / report.csv of `rows`, AUROC bars per class, a K/alpha scatter per tuned class, a
    Pareto plot per class tuned with tune.multi_objective.

    Args:
        rows, trials: what `collect_results` returned.
        out: the folder to write to.

    Returns:
        The files written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = [*METRICS, *RECALLS]  # recall: blank for an exact row
    header = ["category", "backbone", "weights", "method", "mode", *numbers]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * 5 + "---:|" * len(numbers)]
    csv_rows = []
    for r in rows:
        vals = [r.get(m) for m in numbers]
        md.append("| " + " | ".join([r["category"], r["backbone"], Path(r["weights"]).name, r["method"], r["mode"]]
                                    + ["-" if v is None else f"{100 * v:.1f}" for v in vals]) + " |")
        # weights is a path and method a spec with commas (ldknn(k=9,alpha=1)): the csv module quotes them
        csv_rows.append({"category": r["category"], "backbone": r["backbone"], "weights": r["weights"],
                         "method": r["method"], "mode": r["mode"],
                         **{m: None if v is None else f"{v:.6f}" for m, v in zip(numbers, vals)}})
    note = mode_footnote(rows)
    written = [out / "report.md", out / "report.csv"]
    write_text_atomic(written[0], "\n".join(md) + "\n" + (f"\n{note}\n" if note else ""))
    write_text_atomic(written[1], to_csv(csv_rows, header))
    if rows:
        written.append(_auroc_bars(rows, out / "auroc_by_class.png"))
    searches = [t for t in trials if "pareto" in t]  # collect_results' Pareto records, one per class
    trials = [t for t in trials if "pareto" not in t and "val_image_auroc" in t]  # image trials, not the map search's
    for category in sorted({t["category"] for t in trials}):
        written.append(_k_alpha_surface([t for t in trials if t["category"] == category], category,
                                        out / f"k_alpha_{category}.png"))
    for search in searches:
        p = search["pareto"]
        written.append(save_figure(pareto_plot(p["trials"], p["front"], p["choice"], p["reference"],
                                               search["category"]), out / f"pareto_{search['category']}.png", 120))
    return written


def _auroc_bars(rows: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    categories = sorted({r["category"] for r in rows})
    series = sorted({(r["backbone"], Path(r["weights"]).name, r["method"], r["mode"]) for r in rows})
    fig = Figure(figsize=(max(6, 1.2 * len(categories) * max(1, len(series)) / 3), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        values = [next((r["image_auroc"] for r in rows if (r["category"], r["backbone"], Path(r["weights"]).name,
                                                            r["method"], r["mode"]) == (c, *s)), np.nan)
                  for c in categories]
        ax.bar(np.arange(len(categories)) + i * width, 100 * np.array(values), width, label=" / ".join(s))
    ax.set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories)
    ax.set_ylabel("image AUROC (%)")
    low = np.nanmin([100 * r["image_auroc"] for r in rows])
    ax.set_ylim(max(0, low - 5), 100.5)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("image AUROC per class: backbone / weights / method / mode")
    fig.tight_layout()
    return save_figure(fig, path, 120)


def chosen_trial(trials: list[dict]) -> dict:
    """The image trial the search chose: the best `objective` (image AUROC, pixel AUROC breaking
    ties), as Ray Tune picked it; not the best image AUROC alone, which ties and then named another
    trial than selection.json's. Trials logged before the objective was kept: by image AUROC."""
    ranked = [t.get("objective", t.get("val_image_auroc", np.nan)) for t in trials]
    return trials[int(np.nanargmax(ranked))]


def _k_alpha_surface(trials: list[dict], category: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.add_subplot()
    values = [100 * t.get("val_image_auroc", np.nan) for t in trials]
    points = ax.scatter([t["k"] for t in trials], [t["alpha"] for t in trials], c=values, cmap="viridis", s=40)
    best = chosen_trial(trials)
    ax.scatter([best["k"]], [best["alpha"]], marker="*", s=250, c="red", label="chosen")
    fig.colorbar(points, ax=ax, label="validation image AUROC (%)")
    ax.set_xlabel("K")
    ax.set_ylabel("alpha")
    ax.set_title(f"{category}: tune trials")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path, 120)
