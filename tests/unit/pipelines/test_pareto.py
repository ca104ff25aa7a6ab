"""The multi-objective tune's pure part: the Pareto front of (image AUROC, map objective), the one
choice taken from it, its plot, and the report drawing it from a store's record."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from reb_dist.pipelines.selection import pareto_choice, pareto_front
from reb_dist.reporting.plots import pareto_plot, save_figure
from reb_dist.reporting.report import write_report


def point(image: float, map_objective: float, k: int = 1, alpha: float = 0.0) -> dict:
    return {"k": k, "alpha": alpha, "val_image_auroc": image, "map_objective": map_objective}


def values(points: list[dict]) -> list[tuple[float, float]]:
    return [(p["val_image_auroc"], p["map_objective"]) for p in points]


def test_the_front_leaves_dominated_points_out_and_runs_by_image_auroc():
    trials = [point(0.9, 0.5), point(0.7, 0.8), point(0.8, 0.6), point(0.75, 0.55),  # under (0.8, 0.6)
              point(0.6, 0.7), point(0.95, 0.4), point(0.5, 0.1)]
    assert values(pareto_front(trials)) == [(0.7, 0.8), (0.8, 0.6), (0.9, 0.5), (0.95, 0.4)]


def test_ties_on_one_objective_keep_the_better_other_and_equal_points_once():
    first, same = point(0.9, 0.5, k=3), point(0.9, 0.5, k=7)
    trials = [point(0.9, 0.4), first, same, point(0.8, 0.5), point(0.7, 0.9)]
    front = pareto_front(trials)
    assert values(front) == [(0.7, 0.9), (0.9, 0.5)]
    assert front[1] is first  # of equal points, the first given stands for them


def test_non_finite_points_are_left_out():
    front = pareto_front([point(math.nan, 0.9), point(0.8, math.nan), point(0.6, 0.6), point(0.7, 0.5)])
    assert values(front) == [(0.6, 0.6), (0.7, 0.5)]
    assert pareto_front([]) == []


def test_every_front_point_is_undominated_and_every_other_point_dominated():
    import numpy as np

    rng = np.random.default_rng(0)
    trials = [point(float(a), float(b)) for a, b in rng.integers(0, 6, (60, 2)) / 5]  # many ties
    front = pareto_front(trials)
    dominates = lambda a, b: (a["val_image_auroc"] >= b["val_image_auroc"] and a["map_objective"] >= b["map_objective"]
                              and values([a]) != values([b]))
    assert not any(dominates(a, b) for a in front for b in front)
    assert all(any(dominates(f, t) or values([f]) == values([t]) for f in front) for t in trials)


FRONT = [point(0.7, 0.8, k=2), point(0.8, 0.6, k=4), point(0.9, 0.5, k=8), point(0.95, 0.4, k=16)]


def test_the_choice_is_the_best_image_auroc_whose_map_is_at_least_the_defaults():
    assert pareto_choice(FRONT, point(0.85, 0.55))["k"] == 4
    assert pareto_choice(FRONT, point(0.85, 0.6))["k"] == 4  # equal to the default's counts
    assert pareto_choice(FRONT, point(0.99, 0.3))["k"] == 16
    assert pareto_choice(FRONT, point(0.5, 0.8))["k"] == 2


def test_when_no_map_is_as_good_as_the_defaults_the_best_map_is_taken():
    assert pareto_choice(FRONT, point(0.5, 0.85))["k"] == 2
    assert pareto_choice(FRONT[1:], point(0.5, 0.85))["k"] == 4
    assert pareto_choice(FRONT, point(0.5, math.nan))["k"] == 2  # no map objective to meet
    assert pareto_choice([], point(0.5, 0.5)) is None


@pytest.fixture
def record():
    trials = [*FRONT, point(0.6, 0.3, k=5, alpha=0.5), point(0.85, 0.45, k=6, alpha=1.5)]
    front = pareto_front(trials)
    reference = point(0.85, 0.55, k=9, alpha=1.0)
    return {"trials": trials, "front": front, "choice": pareto_choice(front, reference), "reference": reference}


def test_the_plot_shows_trials_front_choice_and_default(tmp_path, record):
    fig = pareto_plot(record["trials"], record["front"], record["choice"], record["reference"], "bottle")
    ax = fig.axes[0]
    line = ax.get_lines()[0]
    assert list(zip(line.get_xdata(), line.get_ydata())) == values(FRONT)
    offsets = [c.get_offsets().tolist() for c in ax.collections]
    assert offsets == [[list(v) for v in values(record["trials"])], [[0.85, 0.55]], [[0.8, 0.6]]]
    assert "image AUROC" in ax.get_xlabel() and "map objective" in ax.get_ylabel() and "bottle" in ax.get_title()
    labels = ax.get_legend_handles_labels()[1]
    assert "choice (K=4, alpha=0)" in labels and "default (K=9, alpha=1)" in labels
    path = save_figure(fig, tmp_path / "pareto_bottle.png", 120)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (660, 504)


def test_the_report_draws_a_stored_pareto_search(tmp_path, record):
    trials = [{"category": "bottle", "k": 4, "alpha": 0.1, "val_image_auroc": 0.9},
              {"category": "bottle", "pareto": record}]
    written = write_report([], trials, tmp_path)
    assert tmp_path / "pareto_bottle.png" in written and tmp_path / "k_alpha_bottle.png" in written
    assert (tmp_path / "pareto_bottle.png").stat().st_size > 1000
    assert not (tmp_path / "k_alpha_pareto.png").exists() and len(written) == 4


def test_the_tune_plot_stars_the_trial_the_search_chose():
    """Two trials tie on validation image AUROC; the search chose by its objective (pixel AUROC breaks
    the tie), and the plot starred the first of the tie instead (K 36 starred, K 39 chosen)."""
    from reb_dist.reporting.report import chosen_trial

    trials = [{"k": 36, "alpha": 1.43, "val_image_auroc": 0.98, "objective": 0.98 + 1e-3 * 0.90},
              {"k": 39, "alpha": 1.09, "val_image_auroc": 0.98, "objective": 0.98 + 1e-3 * 0.95},
              {"k": 9, "alpha": 1.0, "val_image_auroc": 0.97, "objective": 0.97 + 1e-3 * 0.99}]
    assert (chosen_trial(trials)["k"], chosen_trial(trials)["alpha"]) == (39, 1.09)
