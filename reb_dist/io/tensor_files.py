"""Reading reb-dist's safetensors files (models and bank shards): tensors plus JSON metadata, never
a pickle, each file tagged with its format so one kind is never read as the other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open

from reb_dist.errors import ModelFileError


def read_tensors(path: Path, file_format: str, what: str,
                 names: tuple[str, ...] = ()) -> tuple[dict[str, str], dict[str, np.ndarray | None]]:
    """Metadata and the named tensors (None where absent) of a reb-dist safetensors file.

    Raises:
        ModelFileError: the file is missing, not safetensors, or not of `file_format`.
    """
    if not path.is_file():
        raise ModelFileError(f"{path}: {what} not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") == file_format:
                tensors = {n: f.get_tensor(n) if n in f.keys() else None for n in names}
    except Exception as exc:
        raise ModelFileError(f"{path}: not a reb-dist {what} ({exc})") from exc
    if meta.get("format") != file_format:
        raise ModelFileError(f"{path}: format {meta.get('format')!r}, expected {file_format!r}")
    return meta, tensors
