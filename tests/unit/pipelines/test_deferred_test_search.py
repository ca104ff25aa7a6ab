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


def test_a_faithful_tunes_test_rows_score_images_as_the_exact_path_does():
    """reb tune's reported test rows refine each image's hottest patches exactly, as evaluate does, and
    its validation table the hottest patches of the search box's corners: with an approximate bank
    their image scores are the exact tables' (they were not before)."""
    from reb_dist.core.anomaly_map import image_scores
    from reb_dist.core.ldknn.selection import ldknn_maps

    base = [*BOTTLE, "data.image_size=128", "tune.validation=test", "tune.k_max=8", "cache.enabled=false"]
    rough = ["bank.neighbour_search=ivf", "bank.query_search=ivf", "bank.nprobe=2"]

    def scores(*settings: str) -> np.ndarray:
        cfg = RunConfig.load(None, base + list(settings))
        c = class_tables("bottle", cfg.data, cfg.backbone, cfg.scoring, cfg.bank, cfg.tune)
        return image_scores(c.test_ldknn_maps(8, 2.0)), c

    exact, c_exact = scores("preset=exact")
    faithful, c = scores(*rough)
    unrefined, _ = scores(*rough, "bank.refine_top=0")
    assert c_exact.test_refine is None and c.test_refine is not None
    assert not np.allclose(unrefined, exact)  # the rough search moved image scores
    np.testing.assert_allclose(faithful, exact, rtol=1e-6)  # the tables take densities as prefix means
    for k, alpha in [(8, 2.0), (3, 0.5)]:  # validation: every trial reads the refined table
        want = image_scores(ldknn_maps(c_exact.val, k, alpha))
        np.testing.assert_allclose(image_scores(ldknn_maps(c.val, k, alpha)), want, rtol=1e-6)
    cfg = RunConfig.load(None, base + rough)
    assert reported_metrics(c, 8, 2.0, cfg.scoring)["image_auroc"] == reported_metrics(c_exact, 8, 2.0, cfg.scoring)["image_auroc"]
