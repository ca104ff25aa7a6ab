"""How many threads this process may use: one rule for torch, ONNX Runtime, faiss and the metrics."""

from __future__ import annotations

import os


def resolve_threads(threads: int = 0) -> int:
    """`threads`, or for 0 the CPUs this process may use (OMP_NUM_THREADS when set, as Ray sets it to
    a task's or actor's CPU share; else the process's CPU affinity)."""
    if threads > 0:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
