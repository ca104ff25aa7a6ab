"""A saved model served from sharded Ray actors scores as in process."""

from __future__ import annotations
import numpy as np
from reb_dist.config import RunConfig
from tests.conftest import BOTTLE
from reb_dist.io.model_file import load_model
from reb_dist.distributed.sharded_bank import sharded_index_factory


def test_a_saved_model_served_from_sharded_actors_scores_as_in_process(local_ray, cfg, detector, test_features,
                                                                        saved, tmp_path):
    """Real Lite0 features of the sample bottles: 2 shard actors give the in-process scores."""
    _, path = saved
    methods = detector.methods()
    want = detector.score_features(test_features, methods)
    bank = RunConfig.load(None, BOTTLE + ["bank.shards=2", "bank.shard_cpus=0.5"]).bank
    sharded = load_model(path, device="cpu", bank=bank, index_factory=sharded_index_factory(bank, tmp_path / "shards"))
    try:
        assert type(sharded.scorer.index).__name__ == "ShardedBank"
        [folder] = (tmp_path / "shards").iterdir()  # one sub-folder per bank, named by its fingerprint
        assert folder.name == sharded.scorer.index.bank_id
        assert sorted(p.name for p in folder.iterdir()) == [
            "bank.json", "shard-000-of-002.safetensors", "shard-001-of-002.safetensors"]
        got = sharded.score_features(test_features, methods)
    finally:
        sharded.close()
    for m in methods:
        np.testing.assert_allclose(got[m].patch_maps, want[m].patch_maps, rtol=1e-4, atol=1e-3, err_msg=m.label)
