"""K/alpha selection looks at the validation tables only, never at the reported test images.

Hand-built tables where the two disagree: on validation a large alpha hurts (anomalies sit next to
dense bank points), on the reported test images a large alpha helps (normals do). A selection
that peeked at the test images would pick alpha > 1/3; an honest one picks alpha < 1/3.
"""

from __future__ import annotations

import numpy as np

from reb_dist.config import ScoringConfig, TuneConfig
from reb_dist.core.ldknn.selection import NeighbourTable
from reb_dist.pipelines.selection import ClassTables, global_choice, reported_metrics

CROSSOVER = 1 / 3  # density 3 x alpha = 1 (the distance gap) where the ranking flips


def table(nn_dist2: list[float], density: list[float], k_max: int = 8) -> NeighbourTable:
    """One patch per image (h = w = 1); image i's nearest bank point is row i, of the given density."""
    n = len(nn_dist2)
    return NeighbourTable(np.asarray(nn_dist2, np.float32).reshape(n, 1, 1), np.arange(n).reshape(n, 1, 1),
                          np.repeat(np.asarray(density, np.float32)[:, None], k_max, axis=1))


def disagreeing_tables(category: str = "c") -> ClassTables:
    labels = np.array([0, 0, 1, 1])
    val = table([1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 3.0, 3.0])  # anomalies next to dense points
    test = table([2.0, 2.0, 1.0, 1.0], [3.0, 3.0, 0.0, 0.0])  # normals next to dense points
    return ClassTables(category, val, labels, None, test, labels, None, ["good", "good", "x", "x"], {})


def test_the_tables_really_disagree():
    c = disagreeing_tables()
    scoring = ScoringConfig()
    assert reported_metrics(c, 4, 0.0, scoring)["image_auroc"] == 0.0
    assert reported_metrics(c, 4, 1.0, scoring)["image_auroc"] == 1.0


def test_global_choice_takes_the_validation_optimum():
    tune = TuneConfig(k_min=1, k_max=8, alpha_min=0.0, alpha_max=2.0)
    k, alpha, objective = global_choice([disagreeing_tables("a"), disagreeing_tables("b")], tune, ScoringConfig())
    assert alpha < CROSSOVER and objective == 1.0
    assert reported_metrics(disagreeing_tables(), k, alpha, ScoringConfig())["image_auroc"] == 0.0
