"""Starting or joining Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS, e.g. under `ray job submit`), else start a local Ray.

    Returns True when this call started Ray (so the caller should shut it down), False when Ray was
    already up. Logical CPUs may exceed physical ones: Ray Data readers, DefectMaker actors and the
    training workers then all get a slot on a 2-core machine instead of waiting for each other.
    """
    import ray

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=True, runtime_env={"env_vars": dict(QUIET_ENV)})
    return True


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """`ensure_ray` for the length of a block: a Ray this call started is shut down after it."""
    started = ensure_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
