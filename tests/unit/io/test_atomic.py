"""The one atomic writer: all or nothing, and files other users can read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from reb_dist.io.atomic import copy_atomic, write_atomic, write_text_atomic


def test_a_failed_write_leaves_neither_a_file_nor_a_temporary(tmp_path: Path) -> None:
    def crash(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a file")
        raise OSError("disk full")

    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "b.png", crash)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "keep.txt", crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "old"  # a failed replace keeps the old file


def test_files_get_the_umask_permissions_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        paths = [write_text_atomic(tmp_path / "a" / "r.md", "x"),
                 copy_atomic(tmp_path / "a" / "r.md", tmp_path / "copy.md")]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert (tmp_path / "copy.md").read_text() == "x"
