"""A lock held by another process, as a second `reb` command running at once would hold it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HOLD = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def lock_held_elsewhere(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (as `reb_dist.io.atomic.file_lock` takes it), held by a child
    process for the block; the child is killed after it, which lets the lock go."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
