"""Starting or joining Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from reb_dist.distributed.worker_setup import SETUP_HOOK
from reb_dist.environ import environ_restored

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    # two Ray Train workers importing torch on a busy 2-core machine can take more than Ray's 60 s
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
}
# Ray's switch for a single-machine Ray (on by default only on Windows and macOS): the node's address is
# 127.0.0.1, so its GCS, raylet, workers and agents listen on the loopback interface only
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    main_thread = threading.current_thread() is threading.main_thread()
    own_handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        with _loopback_only():
            ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=True, runtime_env={"env_vars": dict(QUIET_ENV),
                                                      "worker_process_setup_hook": SETUP_HOOK})
    if main_thread:
        # ray.init replaced the SIGTERM handler: the program's own one (the sweep's stop between cells,
        # or SIG_IGN) is put back, else SIGTERM interrupts the command
        kept = callable(own_handler) or own_handler == signal.SIG_IGN
        signal.signal(signal.SIGTERM, own_handler if kept else interrupt_on_sigterm)
    return not address


_sigterms: list[int] = []  # every SIGTERM that stopped something in this process (see sigterm_count)


def sigterm_count() -> int:
    """How many SIGTERMs have stopped something in this process: what tells a KeyboardInterrupt that
    came from SIGTERM, since inside `ray.get` Ray raises a bare KeyboardInterrupt in place of the
    handler's `Terminated`."""
    return len(_sigterms)


def terminated(signum: int):
    """The `Terminated` to raise for signal `signum`, counted (`sigterm_count`)."""
    from reb_dist.errors import Terminated

    _sigterms.append(signum)
    return Terminated(signal.Signals(signum).name)


def interrupt_on_sigterm(signum, frame):
    """A SIGTERM handler (`ray job stop`, `kill`): the command stops as on Ctrl-C (one line, MLflow runs
    FAILED, nothing half-written); a second SIGTERM ends the process at once. Where Ray is up, Ray's core
    worker had set a native handler that printed a stack dump and aborted the process (exit 134)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise terminated(signum)


@contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local Ray starts: its node address is 127.0.0.1, so nothing it runs listens on other
    interfaces (by default its servers listen on all of them). The processes it starts keep the
    setting; this process gets its own back, so joining a cluster later works as before."""
    from ray._private import ray_constants

    before_flag = ray_constants.ENABLE_RAY_CLUSTER
    with environ_restored(SINGLE_MACHINE_ENV):
        os.environ[SINGLE_MACHINE_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            yield
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = before_flag


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
