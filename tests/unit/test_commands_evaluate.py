"""Commands as Python functions: settings flow one way, and what a run resolved is returned and logged."""

from __future__ import annotations

import copy
import json

from reb_dist.config import RunConfig
from reb_dist.commands.evaluate import evaluate
from tests.conftest import BOTTLE


def test_evaluate_leaves_the_settings_as_given_and_records_the_models(saved, tmp_path):
    _, model = saved  # fitted with K=9, alpha=1, 256 px
    cfg = RunConfig.load(None, BOTTLE + ["scoring.k=5", "scoring.alpha=0.5", "data.image_size=128",
                                         f"output_dir={tmp_path}"])
    before = copy.deepcopy(cfg.to_dict())
    result = evaluate(cfg, model, "reb evaluate ...")
    assert cfg.to_dict() == before
    assert result.image_size == 256 and [m.method.label for m in result.methods] == ["ldknn(k=9,alpha=1)"]
    written = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert written["config"]["scoring"]["k"] == 5  # what the user asked for ...
    assert written["resolved"]["scoring"]["k"] == 9 and written["resolved"]["image_size"] == 256  # ... and got
    assert written["resolved"]["model"] == str(model)


def test_evaluate_scores_the_methods_asked_for_from_the_models_bank(saved, tmp_path, caplog):
    """`reb evaluate -m M --methods lof` once warned that the model's methods were used, then scored ldknn."""
    _, model = saved  # fitted with methods [ldknn, knn, nn1], K=9, alpha=1
    cfg = RunConfig.load(None, BOTTLE + ["scoring.methods=[lof,knn]", f"output_dir={tmp_path}"])
    with caplog.at_level("INFO"):
        result = evaluate(cfg, model)
    assert [m.method.label for m in result.methods] == ["lof(k=9)", "knn(k=9)"]  # the model's K
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "scoring.methods" in r.getMessage()]
    assert all(0.5 < m.metrics["image_auroc"] <= 1 for m in result.methods)
