"""The one way reb-dist writes a file: to a temporary name beside it, then renamed into place.

A crashed or killed run never leaves a half-written model, shard, result or PNG (that MLflow or a
resumed sweep would pick up). Temporary files are created with a plain open(), not mkstemp, so the
result has the usual permissions (0644 under the default umask; mkstemp's 0600 made models from
`reb fit` unreadable to other users).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path`.

    Args:
        path: the file to create or replace; its folder is created if missing.
        write: writes the whole file to the temporary path it is given.

    Returns:
        `path` as a Path. On any error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def copy_atomic(source: str | Path, path: str | Path) -> Path:
    """Copy the file `source` to `path` atomically; returns `path`."""
    return write_atomic(path, lambda tmp: shutil.copyfile(source, tmp))
