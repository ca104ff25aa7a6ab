"""The pipelines are Ray-free: a bank's placement comes from above (the commands), never imported."""

from __future__ import annotations

import pytest

from reb_dist.config import RunConfig
from reb_dist.core.ldknn import BankIndex
from reb_dist.errors import ConfigError
from reb_dist.pipelines.evaluate import fit_detector, load_category
from tests.conftest import BOTTLE


def test_a_given_placement_indexes_the_bank_and_shards_without_one_are_refused(tmp_path):
    cfg = RunConfig.load(None, BOTTLE + ["data.few_shot=2", "cache.enabled=false", f"output_dir={tmp_path}"])
    split = load_category(cfg.data, "bottle")
    asked, built = [], []

    def placement(category):
        asked.append(category)
        return lambda vectors: built.append(len(vectors)) or BankIndex(vectors)

    detector = fit_detector(cfg, split, placement)
    assert asked == ["bottle"] and built == [len(detector.bank)]  # the placement's factory indexed the bank

    sharded = RunConfig.load(None, BOTTLE + ["data.few_shot=2", "bank.shards=2"])
    with pytest.raises(ConfigError, match="bank.shards=2 holds the bank on Ray actors"):
        fit_detector(sharded, split)
