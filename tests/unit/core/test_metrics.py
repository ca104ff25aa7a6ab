"""Metrics against scikit-learn, an independent argsort-based PRO (the MVTec algorithm) and
hand-computed curves."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from reb_dist.core import metrics as M


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- AUROC / ROC


@pytest.mark.parametrize("n", [2, 3, 5, 17, 200, 5000])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auroc_matches_sklearn_with_ties(n: int, decimals: int | None) -> None:
    rng = _rng(n)
    for _ in range(5):
        y = rng.integers(0, 2, n)
        y[0], y[-1] = 0, 1
        s = rng.normal(size=n) + y
        if decimals is not None:
            s = np.round(s, decimals)  # heavy ties
        assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_auroc_all_tied_and_perfect() -> None:
    assert M.auroc([0, 1, 0, 1], [3, 3, 3, 3]) == 0.5
    assert M.auroc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert M.auroc([True, False], [0.0, 1.0]) == 0.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_auroc_single_class_raises(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="only one class"):
        M.auroc(labels, np.arange(len(labels), dtype=float))


def test_auroc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0, 1], [0.0, np.nan])
    with pytest.raises(ValueError, match="0/1"):
        M.auroc([-1, 1], [0.0, 1.0])
    with pytest.raises(ValueError, match="length"):
        M.auroc([0, 1], [0.0, 1.0, 2.0])


def test_roc_curve_matches_sklearn_points() -> None:
    rng = _rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y  # continuous: tie-free
    for drop in (False, True):
        ours = M.roc_curve(y, s, drop_intermediate=drop)
        ref = skm.roc_curve(y, s, drop_intermediate=drop)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b)


def test_roc_curve_ties_form_one_step() -> None:
    fpr, tpr, thr = M.roc_curve([0, 1, 1, 0], [0.5, 0.5, 0.9, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.1])


def test_image_and_pixel_auroc_match_sklearn() -> None:
    rng = _rng(2)
    masks = rng.random((6, 32, 40)) > 0.9
    maps = np.round(rng.random((6, 32, 40)) + 0.3 * masks, 2).astype(np.float32)
    ref = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(masks, maps) == pytest.approx(ref, abs=1e-12)
    # A list of per-image arrays (sizes may differ between images) gives the same result.
    assert M.pixel_auroc(list(masks.astype(np.uint8)), list(maps)) == pytest.approx(ref, abs=1e-12)
    y, s = [0, 0, 1, 1, 1], [0.2, 0.4, 0.4, 0.9, 0.1]
    assert M.image_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    with pytest.raises(ValueError, match="only one class"):
        M.pixel_auroc(np.zeros((2, 4, 4), bool), maps[:2, :4, :4])


# --------------------------------------------------------------------------- AUPRO


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Straightforward MVTec-style PRO: full argsort, one point per distinct score, cut at limit."""
    weights = np.zeros(masks.shape)
    n_regions = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            weights[i][lab == r] = 1.0 / (lab == r).sum()
        n_regions += n
    s, w, neg = maps.ravel(), weights.ravel(), ~masks.ravel()
    order = np.argsort(-s, kind="stable")
    s, w, neg = s[order], w[order], neg[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    fpr = np.r_[0, np.cumsum(neg)[last_of_tie] / neg.sum()]
    pro = np.r_[0, np.cumsum(w)[last_of_tie] / n_regions]
    return _normalised_area(fpr, pro, limit)


def _normalised_area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under (fpr, pro), fpr non-decreasing from 0, cut at limit, divided by it."""
    keep = fpr <= limit
    area = np.trapezoid(pro[keep], fpr[keep])
    j = keep.sum()
    if j < fpr.size and fpr[j - 1] < limit:
        y_cut = np.interp(limit, fpr[j - 1 : j + 1], pro[j - 1 : j + 1])
        area += 0.5 * (pro[j - 1] + y_cut) * (limit - fpr[j - 1])
    return area / limit


def _blob_masks(rng: np.random.Generator, n: int = 8, h: int = 48, w: int = 48) -> np.ndarray:
    masks = np.zeros((n, h, w), bool)
    for i in range(n // 2):  # half the images are normal
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 10, 2)
            masks[i, y : y + rng.integers(2, 10), x : x + rng.integers(2, 10)] = True
    return masks


def test_aupro_perfect_map_is_one() -> None:
    masks = _blob_masks(_rng(3))
    assert M.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert M.aupro(masks, masks.astype(np.float32), num_thresholds=50) == pytest.approx(1.0)


def test_aupro_random_map_is_low() -> None:
    rng = _rng(4)
    masks = _blob_masks(rng)
    value = M.aupro(masks, rng.random(masks.shape, dtype=np.float32))
    assert 0.05 < value < 0.25  # expected PRO(f) = f for random scores: area/0.3 = 0.15


@pytest.mark.parametrize("limit", [0.3, 0.05, 0.137, 1.0])
@pytest.mark.parametrize("decimals", [None, 1])
def test_aupro_matches_reference(limit: float, decimals: int | None) -> None:
    rng = _rng(5)
    masks = _blob_masks(rng)
    maps = rng.random(masks.shape) + 0.4 * masks * rng.random(masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    ref = _reference_aupro(masks, maps, limit)
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(ref, abs=1e-9)
    assert M.aupro(masks, maps, fpr_limit=limit, num_thresholds=2000) == pytest.approx(ref, abs=5e-3)


def _two_region_example() -> tuple[np.ndarray, np.ndarray]:
    """80 normal pixels scored k/80; region A (10 px) scored 2 (always found first); region B
    (10 px): 5 px tied with the 5th-highest normal pixel, 5 px scored -1 (never found)."""
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:5] = True  # A
    mask[8:10, 5:10] = True  # B, not touching A
    amap = np.zeros((10, 10))
    amap[~mask] = np.arange(80)[::-1] / 80  # 79/80, 78/80, ... 0
    amap[0:2, 0:5] = 2.0
    amap[8, 5:10] = 75 / 80  # ties with the 5th-highest normal score
    amap[9, 5:10] = -1.0
    return mask[None], amap[None]


def test_aupro_hand_computed() -> None:
    masks, maps = _two_region_example()
    # Curve: (0, 0) -> (0, .5) -> (4/80, .5) -> tie: diagonal to (5/80, .75) -> flat .75 until
    # normal pixels run out, then B's last half at FPR 1.
    assert M.aupro(masks, maps, fpr_limit=4 / 80) == pytest.approx(0.5)
    a = 0.5 * 4 / 80 + 0.5 * (0.5 + 0.75) / 80 + 0.75 * (0.3 - 5 / 80)
    assert M.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(a / 0.3)
    # Cut inside the diagonal segment: interpolated PRO .625 at FPR 4.5/80.
    a = 0.5 * 4 / 80 + 0.5 * (0.5 + 0.625) * 0.5 / 80
    assert M.aupro(masks, maps, fpr_limit=4.5 / 80) == pytest.approx(a / (4.5 / 80))
    fpr, pro = M.pro_curve(masks, maps)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0, 0, 1, 1)


def test_aupro_one_region_found_one_never() -> None:
    masks, maps = _two_region_example()
    maps = maps.copy()
    maps[0, 8, 5:10] = -1.0  # B never found before FPR 1: PRO is 0.5 on the whole range
    for limit in (0.01, 0.3, 0.9):
        assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(0.5)


def test_aupro_respects_fpr_limit() -> None:
    masks, maps = _two_region_example()
    maps = maps.copy()
    maps[masks] = 40.5 / 80  # both regions found at once, past 39 of the 80 normal pixels
    assert M.aupro(masks, maps, fpr_limit=0.3) == 0.0
    assert M.aupro(masks, maps, fpr_limit=0.5) == pytest.approx((0.5 - 39 / 80) / 0.5)
    assert M.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(41 / 80)


def test_aupro_regions_are_8_connected() -> None:
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True  # diagonal touch: one region of 3 px
    amap = np.full((1, 6, 6), 0.5)
    amap[0, 0, 0] = 1.0
    amap[0, 1, 1] = amap[0, 1, 2] = -1.0
    # PRO is 1/3 (not 1/2 as with two 4-connected regions) until all normal pixels are passed.
    assert M.aupro(mask, amap, fpr_limit=0.5) == pytest.approx(1 / 3)


def test_aupro_undefined_is_nan() -> None:
    assert np.isnan(M.aupro(np.zeros((2, 8, 8), bool), np.ones((2, 8, 8))))
    assert np.isnan(M.aupro(np.ones((1, 8, 8), bool), np.ones((1, 8, 8))))
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(np.zeros((1, 4, 4), bool), np.ones((1, 4, 4)), fpr_limit=0)


# --------------------------------------------------------------------------- F1


@pytest.mark.parametrize("seed", range(4))
def test_best_f1_matches_brute_force(seed: int) -> None:
    rng = _rng(seed)
    y = rng.integers(0, 2, 60)
    y[:2] = (0, 1)
    s = np.round(rng.normal(size=60) + y, 1)
    f1, thr = M.best_f1(y, s)
    brute = max(skm.f1_score(y, s >= t) for t in np.unique(s))
    assert f1 == pytest.approx(brute)
    assert skm.f1_score(y, s >= thr) == pytest.approx(f1)


# --------------------------------------------------------------------------- evaluate


def _dataset(rng: np.random.Generator):
    types = ["good"] * 12 + ["scratch"] * 7 + ["dent"] * 6 + ["missing"] * 5
    groups = [""] * 12 + ["structural"] * 13 + ["logical"] * 5
    y = np.array([t != "good" for t in types], int)
    scores = rng.normal(size=y.size) + 1.5 * y
    masks = np.zeros((y.size, 24, 24), bool)
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, 18, 2)
        masks[i, r : r + 5, c : c + 5] = True
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    return y, scores, types, groups, masks, maps


def test_evaluate_keys_and_subset_values() -> None:
    y, scores, types, groups, masks, maps = _dataset(_rng(7))
    r = M.evaluate(y, scores, types, masks, maps, groups=groups)
    for base in ("image_auroc", "pixel_auroc", "aupro"):
        assert base in r
        for suffix in ("scratch", "dent", "missing", "group=structural", "group=logical"):
            assert f"{base}/{suffix}" in r
    assert "image_f1" in r and "image_auroc/good" not in r and "image_auroc/group=" not in r
    assert all(0.0 <= v <= 1.0 and isinstance(v, float) for v in r.values())

    t = np.asarray(types)
    sub = (t == "good") | (t == "dent")
    assert r["image_auroc/dent"] == pytest.approx(skm.roc_auc_score(y[sub], scores[sub]))
    assert r["pixel_auroc/dent"] == pytest.approx(skm.roc_auc_score(masks[sub].ravel(), maps[sub].ravel()))
    assert r["aupro/dent"] == pytest.approx(M.aupro(masks[sub], maps[sub]))
    g = (t == "good") | (np.asarray(groups) == "logical")
    assert r["image_auroc/group=logical"] == pytest.approx(skm.roc_auc_score(y[g], scores[g]))
    assert r["image_auroc"] == pytest.approx(skm.roc_auc_score(y, scores))


def test_evaluate_gives_the_same_figures_on_any_number_of_threads() -> None:
    """Per-type and per-group subsets run side by side; the figures and their order do not depend on it."""
    y, scores, types, groups, masks, maps = _dataset(_rng(7))
    one = M.evaluate(y, scores, types, masks, maps, groups=groups, threads=1)
    for threads in (2, 3, 16):
        many = M.evaluate(y, scores, types, masks, maps, groups=groups, threads=threads)
        assert list(many.items()) == list(one.items())


def test_evaluate_skips_undefined_metrics() -> None:
    y, scores, types, _, masks, maps = _dataset(_rng(8))
    anomalous = y == 1
    r = M.evaluate(y[anomalous], scores[anomalous], np.asarray(types)[anomalous],
                   masks[anomalous], maps[anomalous])  # no normal images
    assert "image_auroc" not in r and "image_f1" not in r and "image_auroc/dent" not in r
    assert "pixel_auroc/dent" in r  # pixels outside the masks are still normal
    r = M.evaluate(y, scores, types)  # image-level only
    assert set(r) == {"image_auroc", "image_f1", "image_auroc/dent", "image_auroc/missing", "image_auroc/scratch"}


def test_pixel_metrics_speed_smoke() -> None:
    """100 maps of 256x256 (6.5M pixels) must stay well under a second each, and still be exact:
    scores lie on a grid of 2^20 levels (about 1.4M distinct values, and ties), so the reference
    here counts pixels per level instead of sorting them."""
    import time

    rng = _rng(9)
    big, small = (np.zeros((100, 256, 256), bool) for _ in range(2))
    big[:50, 100:140, 60:120] = True  # one 40x60 region in each of 50 images
    small[:20, 10:20, 10:20] = True  # and a 10x10 one, scored lower, in 20 of them
    masks = big | small
    levels = 1 << 20
    codes = rng.integers(0, levels, masks.shape) + (levels * 3 // 10) * big + (levels // 10) * small
    maps = (codes / levels).astype(np.float32)  # exact: codes < 2^21
    t0 = time.perf_counter()
    got_auroc, got_aupro = M.pixel_auroc(masks, maps), M.aupro(masks, maps)
    assert time.perf_counter() - t0 < 5.0

    # counts per level, highest level first
    hist = {name: np.bincount(codes[sel], minlength=codes.max() + 1)[::-1].astype(np.float64)
            for name, sel in (("neg", ~masks), ("big", big), ("small", small))}
    pos = hist["big"] + hist["small"]
    neg_below = hist["neg"].sum() - np.cumsum(hist["neg"])  # normal pixels scored strictly lower
    auroc = (pos * (neg_below + 0.5 * hist["neg"])).sum() / (pos.sum() * hist["neg"].sum())
    assert got_auroc == pytest.approx(auroc, abs=1e-12)
    # PRO = mean over the 70 regions of the fraction found; regions of one size pool their pixels
    fpr = np.r_[0, np.cumsum(hist["neg"]) / hist["neg"].sum()]
    pro = np.r_[0, (np.cumsum(hist["big"]) / 2400 + np.cumsum(hist["small"]) / 100) / 70]
    assert got_aupro == pytest.approx(_normalised_area(fpr, pro, 0.3), abs=1e-9)
