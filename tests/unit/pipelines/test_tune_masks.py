"""`tune` and `evaluate` count the same pixels: anomalous images without a mask are left out of the
pixel metrics by both (they used to enter tune's as all-normal masks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reb_dist.config import SAMPLE_DATA, RunConfig
from reb_dist.pipelines.evaluate import evaluate_category
from reb_dist.pipelines.selection import class_tables, reported_metrics

BOTTLE = SAMPLE_DATA / "bottle"
UNMASKED = "broken_large"  # this defect type has no mask files in the folder sets below


def folder_set(root: Path, keep=lambda path: True) -> Path:
    """A folder-layout copy of the sample bottles (only images `keep` accepts in the test folders), with
    masks for every defect type but UNMASKED."""
    for p in (BOTTLE / "train" / "good").glob("*.png"):
        (root / "train").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "train" / p.name)
    for p in (BOTTLE / "test").rglob("*.png"):
        if not keep(p):
            continue
        defect = p.parent.name
        dest = root / "good" if defect == "good" else root / "bad" / defect
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest / p.name)
        if defect not in ("good", UNMASKED):
            (root / "masks" / defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(BOTTLE / "ground_truth" / defect / f"{p.stem}_mask.png", root / "masks" / defect)
    return root


def settings(root: Path) -> RunConfig:
    return RunConfig.load(None, [
        "data.layout=folder", f"data.root={root}", "data.train_dir=train", "data.test_normal_dir=good",
        "data.test_anomalous_dir=bad", "data.mask_dir=masks", "backbone.device=cpu", "tracking.enabled=false",
        "scoring.methods=[ldknn]", "scoring.k=9", "scoring.alpha=1.0", "tune.validation=test", "tune.fraction=0.4",
        "tune.k_max=9", "tune.map_trials=0"])


def test_tune_and_evaluate_agree_on_pixel_metrics_when_some_defects_have_no_mask(tmp_path):
    cfg = settings(folder_set(tmp_path / "all"))
    tables = class_tables("custom", cfg.data, cfg.backbone, cfg.scoring, cfg.bank, cfg.tune, cache=cfg.cache)
    assert UNMASKED in tables.test_types and not tables.test_has_mask.all()
    tuned = reported_metrics(tables, 9, 1.0, cfg.scoring)

    # evaluate on exactly the images tune reported on (the same bank: every training image, exact)
    reported = {(Path(p).parent.name, Path(p).name) for p in tables.split["reported_test"]}
    keep = lambda p: (("good" if p.parent.name == "good" else p.parent.name), p.name) in reported
    cfg2 = settings(folder_set(tmp_path / "reported", keep))
    result = evaluate_category(cfg2, "custom")
    assert sorted(result.labels) == sorted(tables.test_labels)
    evaluated = result.methods[0].metrics
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert tuned[name] == pytest.approx(evaluated[name], abs=1e-6), name
