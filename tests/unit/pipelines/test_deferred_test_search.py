"""reb tune searches the test patches' K nearest bank points (KNN maps) only for the K a reported KNN
map asks for, not at tune.k_max for every test patch up front."""

from __future__ import annotations

import numpy as np

from reb_dist.config import RunConfig
from reb_dist.core.ldknn import ScoringMethod
from reb_dist.core.ldknn.selection import knn_maps
from reb_dist.pipelines.selection import class_tables, reported_metrics
from tests.conftest import BOTTLE


def test_the_test_patches_k_nearest_are_searched_when_a_knn_map_asks_for_them():
    cfg = RunConfig.load(None, [*BOTTLE, "data.image_size=128", "tune.validation=test", "tune.k_max=8",
                                "tune.map_trials=2", "cache.enabled=false"])
    c = class_tables("bottle", cfg.data, cfg.backbone, cfg.scoring, cfg.bank, cfg.tune)
    assert c.val.query_dist2.shape[-1] == 8  # the map search reads every K up to k_max on validation
    assert c.test.query_dist2 is None  # the test table holds each patch's nearest point only, so far
    ldknn_only = reported_metrics(c, 5, 1.0, cfg.scoring, ScoringMethod("ldknn", 3, 0.5))
    assert c.test.query_dist2 is None and "aupro" in ldknn_only  # an LDKNN map needs no K nearest

    knn = reported_metrics(c, 5, 1.0, cfg.scoring, ScoringMethod("knn", 6))
    table = c.test
    assert table.query_dist2.shape == (*table.nn_dist2.shape, 6)
    np.testing.assert_array_equal(table.query_dist2[..., 0], table.nn_dist2)  # the same exact search
    assert (np.diff(table.query_dist2, axis=-1) >= 0).all()
    assert c.test_table(4) is table  # a smaller K reads the columns already kept
    assert knn["image_auroc"] == ldknn_only["image_auroc"]  # the image score is LDKNN's either way
    assert 0.5 < knn["pixel_auroc"] <= 1 and knn["pixel_auroc"] != ldknn_only["pixel_auroc"]
    assert knn_maps(c.test_table(8), 8).shape == table.nn_dist2.shape  # a larger K searches again
