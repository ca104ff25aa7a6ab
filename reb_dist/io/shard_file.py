"""Bank shard files: a slice of a memory bank, where it starts, which shard of which bank it is.

The format of the model file (safetensors: vectors + JSON metadata, no pickle). Every shard carries
the fingerprint of the WHOLE bank it was cut from (`bank_fingerprint`: a hash of the bank's points,
dims, dtype, shard bounds and each shard's content hash), its shard number, and the description the
fingerprint is the hash of, so one shard file alone can be checked against the fingerprint its
reader expects (`load_shard`). A set of shards has a manifest `bank.json` beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from reb_dist.core.ldknn.search import check_bank
from reb_dist.errors import ModelFileError
from reb_dist.io.atomic import write_atomic, write_text_atomic
from reb_dist.io.tensor_files import read_tensors

# /2: shards carry their bank's fingerprint, their number and the bank's description; /1 files
# (a fingerprint of the vectors only, no shard number) are refused rather than trusted
SHARD_FORMAT = "reb-dist-bank-shard/2"


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


def shard_digest(vectors: np.ndarray) -> str:
    """SHA-256 of one shard's vectors: their shape, dtype and bytes."""
    h = hashlib.sha256(str((vectors.shape, str(vectors.dtype))).encode())
    h.update(memoryview(np.ascontiguousarray(vectors)).cast("B"))
    return h.hexdigest()


def describe_bank(bank: np.ndarray, bounds: list[tuple[int, int]]) -> dict:
    """What a bank's fingerprint is the hash of: points, dim, dtype, shard bounds, shard digests."""
    return {"points": len(bank), "dim": int(bank.shape[1]), "dtype": str(bank.dtype),
            "bounds": [[int(a), int(b)] for a, b in bounds],
            "digests": [shard_digest(bank[a:b]) for a, b in bounds]}


def fingerprint_of(description: dict) -> str:
    """The fingerprint of a bank description made by `describe_bank` (16 hex digits)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def bank_fingerprint(bank: np.ndarray, num_shards: int = 1, sizes: list[int] | None = None) -> str:
    """Fingerprint of `bank` (n, d) as cut into `num_shards` shards (or the given `sizes`).

    Equal for equal banks, cut the same way; any change of a vector, the shape, the dtype or the
    cut changes it. It names the shard folder a bank is written to and ties its shard files to it.
    """
    return fingerprint_of(describe_bank(bank, shard_bounds(len(bank), num_shards, sizes)))


def write_shard(path: Path, vectors: np.ndarray, shard: int, description: dict) -> None:
    """Shard number `shard` of the bank `description` describes, written to a temporary name and
    renamed: never left half-written."""
    start, _ = description["bounds"][shard]
    meta = {"format": SHARD_FORMAT, "offset": str(start), "total": str(description["points"]),
            "bank_id": fingerprint_of(description), "shard": str(shard),
            "shards": str(len(description["bounds"])), "bank": json.dumps(description, sort_keys=True)}
    write_atomic(path, lambda tmp: save_file({"vectors": np.ascontiguousarray(vectors)}, tmp, meta))


def read_shard(path: str | Path, with_vectors: bool = True) -> tuple[np.ndarray | None, dict]:
    """(vectors, {offset, total, bank_id, shard, shards, bank}) as the file states them, unchecked
    (see `load_shard`); with_vectors=False reads only the header."""
    path = Path(path)
    meta, tensors = read_tensors(path, SHARD_FORMAT, "bank shard file", ("vectors",) if with_vectors else ())
    try:
        header = {"offset": int(meta["offset"]), "total": int(meta["total"]), "bank_id": meta["bank_id"],
                  "shard": int(meta["shard"]), "shards": int(meta["shards"]), "bank": json.loads(meta["bank"])}
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"{path}: bank shard file with a broken header ({exc!r})") from exc
    return tensors.get("vectors"), header


def load_shard(path: str | Path, bank_id: str | None, shard: int | None) -> tuple[np.ndarray, dict]:
    """Read a shard file and check that it IS shard `shard` of the bank fingerprinted `bank_id`.

    The fingerprint is recomputed from the file's own vectors (their hash, size, dim and dtype put
    in the bank description the header carries), so a file rewritten by another bank, or whose
    vectors do not match its header, is refused whatever its header claims.

    Args:
        path: The shard file.
        bank_id: The fingerprint the reader expects; None accepts the bank the header names (but
            still checks the vectors against it).
        shard: The shard number the reader expects; None accepts the header's.

    Returns:
        ``(vectors, header)`` as `read_shard`.

    Raises:
        ModelFileError: The file is not that shard of that bank; the message names the file, the
            expected and the found fingerprint (and shard number).
    """
    vectors, header = read_shard(path)
    description, own = header["bank"], header["shard"]
    try:  # the description with this shard's entries taken from what the file really holds
        found_description = dict(description, dim=int(vectors.shape[1]), dtype=str(vectors.dtype),
                                 bounds=[list(b) for b in description["bounds"]],
                                 digests=list(description["digests"]))
        found_description["bounds"][own] = [header["offset"], header["offset"] + len(vectors)]
        found_description["digests"][own] = shard_digest(vectors)
        found = fingerprint_of(found_description)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path}: bank shard file with a broken bank description ({exc!r})") from exc
    want = header["bank_id"] if bank_id is None else bank_id
    want_shard = own if shard is None else shard
    if found != want or header["bank_id"] != want or own != want_shard:
        raise ModelFileError(
            f"{path}: expected shard {want_shard} of bank {want}, found shard {own} of "
            f"{header['shards']} of bank {found}" + (f" (its header claims {header['bank_id']})"
                                                     if header["bank_id"] != found else "")
            + "; the shard folder was rewritten, or holds another bank's files")
    return vectors, header


def write_shards(bank: np.ndarray, directory: str | Path, num_shards: int,
                 sizes: list[int] | None = None, dtype: str = "float32",
                 by_fingerprint: bool = False) -> list[Path]:
    """Cut `bank` into shard files shard-000-of-003.safetensors, ... and a manifest bank.json.

    Args:
        bank: The memory bank (n, d).
        directory: Where the files go.
        num_shards: Number of shards.
        sizes: Points per shard; None splits the bank near-equally.
        dtype: Storage dtype, "float32" or "float16".
        by_fingerprint: Put the files in `directory/<bank fingerprint>/` instead, so that two banks
            given one directory (a full and a few-shot bank of one category) never share files.

    Returns:
        The shard files, in bank order.
    """
    bank = check_bank(bank, dtype)
    description = describe_bank(bank, shard_bounds(len(bank), num_shards, sizes))
    bank_id = fingerprint_of(description)
    directory = Path(directory) / bank_id if by_fingerprint else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bounds = description["bounds"]
    paths = []
    for i, (start, stop) in enumerate(bounds):
        path = directory / f"shard-{i:03d}-of-{len(bounds):03d}.safetensors"
        write_shard(path, bank[start:stop], i, description)
        paths.append(path)
    manifest = {"format": SHARD_FORMAT, "bank_id": bank_id, "points": len(bank), "dim": bank.shape[1],
                "dtype": dtype, "shards": [p.name for p in paths]}
    write_text_atomic(directory / "bank.json", json.dumps(manifest, indent=1))
    return paths
