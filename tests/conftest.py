"""Fixtures shared by the test modules that need a real local Ray cluster."""

import pytest


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session (4 logical CPUs on any machine); shut down only if we started it."""
    import ray

    from reb_dist.distributed.runtime import ensure_ray

    started = ensure_ray(num_cpus=4)
    yield
    if started:
        ray.shutdown()
