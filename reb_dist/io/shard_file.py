"""Bank shard files: a slice of a memory bank, where it starts, and which bank it was cut from.

The format of the model file (safetensors: vectors + JSON metadata, no pickle). A set of shards
shares a `bank_id` (a content hash of the whole bank) and has a manifest `bank.json` beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from reb_dist.core.ldknn.search import check_bank
from reb_dist.io.atomic import write_atomic, write_text_atomic
from reb_dist.io.tensor_files import read_tensors

SHARD_FORMAT = "reb-dist-bank-shard/1"


def shard_bounds(n: int, num_shards: int, sizes: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, stop) of each shard: near-equal parts, or the given sizes (which must sum to n)."""
    if sizes is None:
        if not 1 <= num_shards <= n:
            raise ValueError(f"cannot split {n} bank points into {num_shards} shards")
        sizes = [len(part) for part in np.array_split(np.arange(n), num_shards)]
    if sum(sizes) != n or min(sizes) < 1:
        raise ValueError(f"shard sizes {sizes} do not split {n} bank points into non-empty shards")
    stops = np.cumsum(sizes).tolist()
    return list(zip([0, *stops[:-1]], stops))


def bank_fingerprint(bank: np.ndarray) -> str:
    """Content hash that ties a set of shard files to the one bank they were cut from."""
    h = hashlib.sha256(str((bank.shape, str(bank.dtype))).encode())
    h.update(memoryview(np.ascontiguousarray(bank)).cast("B"))
    return h.hexdigest()[:16]


def write_shard(path: Path, vectors: np.ndarray, offset: int, total: int, bank_id: str) -> None:
    """One shard file, written to a temporary name and renamed: never left half-written."""
    meta = {"format": SHARD_FORMAT, "offset": str(offset), "total": str(total), "bank_id": bank_id}
    write_atomic(path, lambda tmp: save_file({"vectors": np.ascontiguousarray(vectors)}, tmp, meta))


def read_shard(path: str | Path, with_vectors: bool = True) -> tuple[np.ndarray | None, dict]:
    """(vectors, {offset, total, bank_id}); with_vectors=False reads only the header."""
    path = Path(path)
    meta, tensors = read_tensors(path, SHARD_FORMAT, "bank shard file", ("vectors",) if with_vectors else ())
    return tensors.get("vectors"), {"offset": int(meta["offset"]), "total": int(meta["total"]), "bank_id": meta["bank_id"]}


def write_shards(bank: np.ndarray, directory: str | Path, num_shards: int,
                 sizes: list[int] | None = None, dtype: str = "float32") -> list[Path]:
    """Cut `bank` into shard files shard-000-of-003.safetensors, ... and a manifest bank.json."""
    bank = check_bank(bank, dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bounds = shard_bounds(len(bank), num_shards, sizes)
    bank_id = bank_fingerprint(bank)
    paths = []
    for i, (start, stop) in enumerate(bounds):
        path = directory / f"shard-{i:03d}-of-{len(bounds):03d}.safetensors"
        write_shard(path, bank[start:stop], start, len(bank), bank_id)
        paths.append(path)
    manifest = {"format": SHARD_FORMAT, "bank_id": bank_id, "points": len(bank), "dim": bank.shape[1],
                "dtype": dtype, "shards": [p.name for p in paths]}
    write_text_atomic(directory / "bank.json", json.dumps(manifest, indent=1))
    return paths
