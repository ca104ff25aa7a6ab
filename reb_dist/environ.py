"""Process environment variables changed for a block only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def environ_restored(*names: str) -> Iterator[None]:
    """Whatever the block does to these environment variables is undone after it: each gets its
    value from before back, or is removed if it had none."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
