"""A disk cache of patch features, one safetensors file per image, so repeated runs skip the backbone.

A file is named by a key that hashes everything its features depend on: the backbone's name and the
fingerprint of its weights, the image size, the aggregation and its dimensions, the device type,
the reb-dist version and the sha256 of the image file's bytes (never its path or mtime). A changed
input is a new key, so it misses; nothing is ever updated in place. Files are written atomically
(`write_atomic`), tagged with their format, key and a checksum of the features, and checked on read:
a file that fails any check is deleted and reported as a miss.

One file per image rather than per batch or per split: the key is per image, so a changed, added or
removed image costs only its own features, and a file serves every split that holds the image (the
tune command's validation and test parts are subsets of a class's train and test images).

Least recently used files are evicted when the folder outgrows `max_bytes`; a hit refreshes the
file's modification time, which is what "recently used" means here (access times are unreliable).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import save_file

from reb_dist.version import __version__
from reb_dist.config import CacheConfig
from reb_dist.core.feature_engines import cache_home
from reb_dist.errors import ModelFileError
from reb_dist.io.atomic import write_atomic
from reb_dist.io.tensor_files import read_tensors

if TYPE_CHECKING:
    from reb_dist.core.detector import Detector

FEATURE_CACHE_FORMAT = "reb-dist-feature-cache/1"
# eviction frees down to this fraction of max_bytes, so the folder is not rescanned on every store
EVICT_TO = 0.9

_HEX = re.compile(r"[0-9a-f]{64}")
_TEMP = re.compile(r"\.[0-9a-f]{64}\.safetensors\.\d+\.[0-9a-f]{8}\.tmp")  # write_atomic's temp names


def default_folder() -> Path:
    """$XDG_CACHE_HOME/reb-dist/features, or ~/.cache/reb-dist/features when that is unset or relative."""
    return cache_home() / "features"


def cache_folder(cfg: CacheConfig) -> Path:
    """The folder `cfg` names: `cfg.dir`, or `default_folder()` when that is empty."""
    return Path(cfg.dir).expanduser() if cfg.dir else default_folder()


def graph_folder(cfg: CacheConfig) -> Path:
    """Where the ONNX feature engine caches its graphs: `onnx/` in the feature cache's folder."""
    return cache_folder(cfg) / "onnx"


def extraction_settings(detector: Detector) -> dict:
    """Everything except the image that a detector's patch features depend on (part of every key).

    The device type and the feature engine are included because their kernels do not give
    bit-identical floats; a reduced precision (a GPU's autocast) because it rounds far more. Float32
    adds no entry, so the keys of float32 features are those of caches written before precisions.
    """
    d = detector
    reduced = {"precision": d.precision} if d.precision != "fp32" else {}
    return {"backbone": d.backbone.name, "fingerprint": d.backbone.fingerprint,
            "image_size": int(d.image_size), "aggregation": d.aggregation,
            "layer_dim": int(d.layer_dim), "target_dim": int(d.target_dim),
            "device": detector.device.type, "engine": detector.engine_name, "reb_dist": __version__, **reduced}


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def feature_key(settings: dict, image_sha256: str) -> str:
    """The cache key (64 hex digits) of one image's features under `extraction_settings`."""
    payload = json.dumps({"format": FEATURE_CACHE_FORMAT, **settings, "image_sha256": image_sha256},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class FeatureCache:
    """Patch features per image in a folder of safetensors files, bounded in size.

    Args:
        folder: where the files live (two-level: `<folder>/<key[:2]>/<key>.safetensors`).
        max_bytes: when the files grow past this, the least recently used are deleted.
    """

    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self._size: int | None = None  # running total since the last scan (None: not scanned yet)

    @classmethod
    def from_config(cls, cfg: CacheConfig) -> FeatureCache | None:
        """The cache `cfg` describes (folder: `cache_folder(cfg)`), or None when it is disabled."""
        if not cfg.enabled:
            return None
        return cls(cache_folder(cfg), int(cfg.max_gb * 1024**3))

    def path(self, key: str) -> Path:
        """The file that holds (or would hold) `key`'s features."""
        if not _HEX.fullmatch(key):
            raise ValueError(f"not a feature cache key: {key!r}")
        return self.folder / key[:2] / f"{key}.safetensors"

    def key(self, settings: dict, image_path: str | Path) -> str:
        """The key of the image file at `image_path` under `settings` (its bytes are hashed)."""
        return feature_key(settings, file_sha256(image_path))

    def lookup(self, key: str) -> np.ndarray | None:
        """The (h, w, D) float32 features stored under `key`, or None (a miss).

        A file that is unreadable, of another format, of another key or whose features fail their
        checksum is deleted and counts as a miss.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            meta, tensors = read_tensors(path, FEATURE_CACHE_FORMAT, "feature cache file", ("features",))
        except ModelFileError:
            self._discard(path)
            return None
        features = tensors["features"]
        if (features is None or features.dtype != np.float32 or features.ndim != 3 or meta.get("key") != key
                or meta.get("sha256") != hashlib.sha256(features.tobytes()).hexdigest()):
            self._discard(path)
            return None
        try:
            os.utime(path)  # mark it recently used
        except OSError:
            pass
        return features

    def store(self, key: str, features: np.ndarray) -> None:
        """Write one image's (h, w, D) features under `key`, atomically; then evict if over the limit.

        A write that fails (disk full, read-only folder) is a warning: the run goes on uncached.
        """
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 3:
            raise ValueError(f"expected one image's (h, w, D) features, got shape {features.shape}")
        path = self.path(key)
        meta = {"format": FEATURE_CACHE_FORMAT, "key": key, "reb_dist_version": __version__,
                "sha256": hashlib.sha256(features.tobytes()).hexdigest()}
        try:
            write_atomic(path, lambda tmp: save_file({"features": features}, tmp, metadata=meta))
            added = path.stat().st_size
        except OSError as exc:
            warnings.warn(f"feature cache: cannot write {path} ({exc}); going on without caching it")
            return
        self._size = self.size() if self._size is None else self._size + added
        if self._size > self.max_bytes:
            self.evict()

    def files(self) -> list[Path]:
        """The cache's feature files (nothing else that may sit in the folder)."""
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.glob("??/*.safetensors")
                if _HEX.fullmatch(p.stem) and p.parent.name == p.stem[:2]]

    def size(self) -> int:
        """Bytes held by the cache's feature files."""
        return sum(size for _, size, _ in self._entries())

    def evict(self, target_bytes: int | None = None) -> int:
        """Delete least recently used files until at most `target_bytes` (default: EVICT_TO of the limit) remain.

        Returns:
            How many files were deleted.
        """
        target = int(self.max_bytes * EVICT_TO) if target_bytes is None else target_bytes
        entries = sorted(self._entries(), key=lambda e: (e[2], e[0].name))  # oldest first
        total = sum(size for _, size, _ in entries)
        removed = 0
        for path, size, _ in entries:
            if total <= target:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        self._size = total
        return removed

    def clear(self) -> int:
        """Delete every feature file (and leftover temporary files); other files are left alone.

        Returns:
            How many feature files were deleted.
        """
        files = self.files()
        for p in files:
            p.unlink(missing_ok=True)
        if self.folder.is_dir():
            for sub in self.folder.iterdir():
                if sub.is_dir() and re.fullmatch(r"[0-9a-f]{2}", sub.name):
                    for p in sub.iterdir():
                        if _TEMP.fullmatch(p.name):
                            p.unlink(missing_ok=True)
                    try:
                        sub.rmdir()  # only when empty
                    except OSError:
                        pass
        self._size = 0
        return len(files)

    def _entries(self) -> list[tuple[Path, int, int]]:
        """(path, bytes, mtime in ns) of every feature file; files deleted meanwhile are skipped."""
        out = []
        for p in self.files():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((p, st.st_size, st.st_mtime_ns))
        return out

    def _discard(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
