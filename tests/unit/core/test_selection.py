"""Validation splits never overlap what results are reported on; one neighbour table scores every (K, alpha)."""

import numpy as np
import pytest

from reb_dist.core.anomaly_map import image_scores
from reb_dist.config import SAMPLE_DATA
from reb_dist.io.data import load_split
from reb_dist.core.ldknn import BankIndex, BankScorer, ScoringMethod
from reb_dist.core.ldknn.selection import ldknn_maps, neighbour_table, patch_masks, tie_weight, validation_objective
from reb_dist.pipelines.validation import holdout_test_split, make_split, synthetic_split

@pytest.fixture(scope="module")
def ci_split():
    """The MVTec AD bottle subset shipped with the package: 16 train, 6 good + 3 x 3 defective test."""
    return load_split("mvtec", SAMPLE_DATA, "bottle")


def test_one_table_gives_ldknn_for_every_k_and_alpha():
    rng = np.random.default_rng(3)
    bank = np.vstack([rng.normal(0, 0.2, (300, 6)), rng.normal(2, 1.0, (300, 6))]).astype(np.float32)
    feats = rng.normal(1, 1.2, (5, 4, 4, 6)).astype(np.float32)
    index = BankIndex(bank)
    table = neighbour_table(index, feats, k_max=16)
    assert table.bank_dist2.shape[0] == len(np.unique(table.nn_row))  # only points patches land next to
    for k in (1, 4, 16):
        for alpha in (0.0, 0.5, 2.0):
            for squared in (True, False):
                want = BankScorer(index).score([ScoringMethod("ldknn", k, alpha, squared)],
                                               feats.reshape(-1, 6))
                got = ldknn_maps(table, k, alpha, squared)
                np.testing.assert_allclose(got.ravel(), next(iter(want.values())), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside 1..16"):
        ldknn_maps(table, 17, 1.0)


def test_patch_masks_and_objective():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[1, :4, :4] = 1
    masks[1, 4, 4] = 1  # 1 pixel of 4 in a patch: not anomalous
    pm = patch_masks(masks, 4, 4)
    assert pm[1].sum() == 4 and not pm[0].any()
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1, :2, :2] = 5.0
    out = validation_objective(maps, np.array([0, 1]), pm, image_scores)
    assert out["val_image_auroc"] == 1.0 and out["val_pixel_auroc"] == 1.0
    assert out["objective"] == pytest.approx(1.0 + tie_weight(1, 1)) and tie_weight(1, 1) < 0.5


def test_synthetic_split_holds_normals_out_of_the_bank(ci_split):
    v = synthetic_split(ci_split, fraction=0.25, seed=1)
    held = {s.image_path for s in v.held_out}
    assert len(held) == 4 and not held & {s.image_path for s in v.train}
    assert len(v.train) + len(held) == len(ci_split.train)
    assert v.test == ci_split.test  # nothing reported is used for validation
    val = v.validation
    assert list(val.labels) == [0, 1] * 4
    for normal, anomalous, mask in zip(val.images[::2], val.images[1::2], val.masks[1::2]):
        assert normal.shape == anomalous.shape == (256, 256, 3) and mask.any()
        changed = np.abs(normal.astype(int) - anomalous.astype(int)).max(axis=2) > 0
        # only the defect differs (no flips or jitter); a blended edge may reach a little past the mask
        assert changed.any() and changed[mask > 0].mean() > 0.5 and changed.mean() < 0.5
    assert synthetic_split(ci_split, 0.25, seed=1).validation.names == val.names  # seeded
    assert synthetic_split(ci_split, 0.25, seed=2).validation.names != val.names
    record = v.record()
    assert record["kind"] == "synthetic" and len(record["held_out_train"]) == 4


def test_test_split_is_disjoint_stratified_and_seeded(ci_split):
    v = holdout_test_split(ci_split, fraction=0.34, seed=0)
    val, rep = {s.image_path for s in v.validation}, {s.image_path for s in v.test}
    assert not val & rep and len(val | rep) == len(ci_split.test)
    types = {s.defect_type for s in v.validation}
    assert types == {s.defect_type for s in ci_split.test}  # every defect type (3 each) and good (6)
    assert [s.image_path for s in make_split(ci_split, "test", 0.34, seed=0).validation] == \
        [s.image_path for s in v.validation]
    with pytest.raises(ValueError, match="only one class"):
        holdout_test_split(ci_split, fraction=0.05)
    with pytest.raises(ValueError, match="unknown validation split"):
        make_split(ci_split, "cross")


def test_tables_sharing_the_banks_stats_search_each_bank_point_once():
    from reb_dist.core.ldknn import BankIndex, BankScorer
    from reb_dist.core.ldknn.selection import neighbour_table

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(400, 8)).astype(np.float32)
    val, test = (rng.normal(size=(3, 4, 4, 8)).astype(np.float32) for _ in range(2))
    index = BankIndex(bank)
    searched = []
    original = index.search_bank_points

    def counting(point_ids, k, progress=None):
        searched.extend(np.asarray(point_ids).tolist())
        return original(point_ids, k, progress)

    index.search_bank_points = counting
    stats = BankScorer(index).stats
    tables = [neighbour_table(index, f, 6, stats=stats) for f in (val, test)]
    assert len(searched) == len(set(searched))  # no bank point searched twice
    plain = BankIndex(bank)
    for table, f in zip(tables, (val, test)):
        alone = neighbour_table(plain, f, 6)
        np.testing.assert_array_equal(table.bank_dist2, alone.bank_dist2)
        np.testing.assert_array_equal(table.nn_dist2, alone.nn_dist2)
