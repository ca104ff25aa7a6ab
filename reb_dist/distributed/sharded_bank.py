"""A memory bank split over Ray actors, searched as one: the K nearest of every shard, merged by
global minimum, equal to a single index over the whole bank.

Each shard lives in a safetensors file (the format of the single-bank model file: vectors plus JSON
metadata) and is held by one actor. An actor that dies (killed, out of memory, its node lost) is
restarted by Ray from its file and the call it was answering is retried; when restarts run out the
search raises, so no partial or silently wrong scores come back.

Every shard file carries the fingerprint of its whole bank and its shard number. An actor is given
both when it is created and checks its file against them each time it loads it, after a restart too
(Ray runs the constructor again), since the file may have been rewritten by another bank since the
bank was opened: a mismatch fails the search with an error naming the file and both fingerprints.

`ShardedBank` implements the `Index` protocol (reb_dist.core.ldknn.index), as the in-process
`BankIndex` does, so `BankScorer`, `BankStats` and the detector use it unchanged. Shard files are
`reb_dist.io.shard_file`'s.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from reb_dist.progress import progress_bar

from reb_dist.config import BankConfig
from reb_dist.core.ldknn import IndexFactory
from reb_dist.core.ldknn.approx import resolve_neighbour_search
from reb_dist.core.ldknn.search import BankIndex, as_float32, check_self_search, drop_self, merge_nearest
from reb_dist.errors import ModelFileError, RebError
from reb_dist.io.shard_file import load_shard, read_shard, write_shards
from reb_dist.pipelines.bank import BankPlacement, shard_folder

class BankShard:
    """What one actor holds: a `BankIndex` over its shard, answering with global ids.

    A plain class, so it also runs in-process; `ShardedBank` wraps it with `ray.remote`.

    Args:
        path: Shard file written by `reb_dist.io.shard_file.write_shards`.
        bank_id: Fingerprint of the bank this shard must belong to; None trusts the file's header (in
            process only: `ShardedBank` always passes the fingerprint it opened).
        shard: Shard number the file must hold; None trusts the header.
        neighbour_search: Candidate search for the density build, already resolved for the whole
            bank by the caller so that every shard searches the same way.
        nprobe: IVF lists probed per query by the approximate index; 0 scales it to the list count.
        use_gpu: Put the exact float32 index on the GPU when faiss has one.
        threads: faiss OpenMP threads for this process; None or 0 leaves the setting alone.
        query_search: Candidate search for test patches, resolved for the whole bank like
            neighbour_search.
    """

    def __init__(self, path: str, bank_id: str | None = None, shard: int | None = None,
                 neighbour_search: str = "auto", nprobe: int = 0, use_gpu: bool = False,
                 threads: int | None = None, query_search: str = "exact"):
        if threads:  # Ray gives fractional-CPU actors OMP_NUM_THREADS=1; whole CPUs get their count
            import faiss

            faiss.omp_set_num_threads(threads)
        # checked on every (re)load: after a Ray restart the file may hold another bank by now
        vectors, meta = load_shard(path, bank_id, shard)
        self.path = path
        self.offset, self.total, self.bank_id = meta["offset"], meta["total"], meta["bank_id"]
        self.shard = meta["shard"]
        # "auto" is resolved for the WHOLE bank by the caller, so every shard uses the same search
        self.index = BankIndex(vectors, use_gpu=use_gpu, dtype=str(vectors.dtype),
                               neighbour_search=neighbour_search, nprobe=nprobe, query_search=query_search)

    def info(self) -> dict:
        """Describe this shard.

        Returns:
            A dict with the actor's ``pid``, the ``shard`` number, its ``offset`` in the bank, its
            ``size``, the bank's ``total`` size and ``bank_id``, and the vectors' ``dim`` and
            storage ``dtype``.
        """
        return {"pid": os.getpid(), "shard": self.shard, "offset": self.offset, "size": len(self.index),
                "total": self.total, "bank_id": self.bank_id, "dim": self.index.dim, "dtype": self.index.dtype}

    def search(self, queries: np.ndarray, k: int, approximate: bool = False,
               exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Search this shard; see `BankIndex.search`.

        Returns:
            ``(dist2, ids)``, each (m, k): squared L2 distances, nearest first, and GLOBAL bank ids.
        """
        dist, ids = self.index.search(queries, k, approximate=approximate, exact=exact)
        return dist, ids + self.offset

    def vectors(self, global_ids: np.ndarray) -> np.ndarray:
        """Return the float32 vectors of the given global ids, which must all lie in this shard."""
        return self.index.vectors(np.asarray(global_ids) - self.offset)


class ShardedBank:
    """A bank over N Ray actors, one shard each. Use `ShardedBank.create(bank, directory, N)` to cut
    and open a bank, `ShardedBank(paths)` to open shard files already written; `close()` (or a
    with-block) stops the actors.

    Args:
        shard_paths: Shard files of one bank, in bank order.
        neighbour_search: "exact", "ivf", "hnsw" or "auto"; "auto" is resolved by the whole bank's size.
        query_search: The same choices for test patches (default exact).
        nprobe: IVF lists probed per query by the approximate index; 0 scales it to the list count.
        cpus_per_shard: CPUs reserved for each actor; its whole part sets the actor's faiss threads.
        gpus_per_shard: GPUs reserved for each actor; above 0 the shards search on the GPU.
        max_restarts: Times Ray restarts a lost actor (and retries its call) before a search fails.
        batch_size: Queries sent to the shards per round.

    Raises:
        ValueError: If `shard_paths` is empty.
        ModelFileError: If the shards are out of order, from different banks, or miss or repeat points.
        RebError: If an actor fails beyond its restarts while opening.
    """

    def __init__(self, shard_paths: list[str | Path], *, neighbour_search: str = "auto", nprobe: int = 0,
                 cpus_per_shard: float = 1.0, gpus_per_shard: float = 0.0, max_restarts: int = 3,
                 batch_size: int = 16384, query_search: str = "exact"):
        import ray

        from reb_dist.distributed.runtime import ensure_ray

        if not shard_paths:
            raise ValueError("a sharded bank needs at least one shard file")
        self.paths = [str(p) for p in shard_paths]
        headers = [read_shard(p, with_vectors=False)[1] for p in self.paths]
        self._check_shards(headers)
        self.bank_id = headers[0]["bank_id"]  # what every actor checks its file against, at each load
        # "auto" is decided by the WHOLE bank's size, so that every shard searches the same way
        total = headers[0]["total"]
        self.neighbour_search = neighbour_search = resolve_neighbour_search(neighbour_search, total)
        self.query_search = query_search = resolve_neighbour_search(query_search, total)
        self._started_ray = ensure_ray()
        self.batch_size = batch_size
        remote = ray.remote(BankShard).options(
            num_cpus=cpus_per_shard, num_gpus=gpus_per_shard,
            max_restarts=max_restarts, max_task_retries=max_restarts,
            scheduling_strategy="SPREAD")  # on a cluster, shards (and their memory) go to different nodes
        threads = max(1, int(cpus_per_shard))
        self.actors = [remote.remote(p, self.bank_id, i, neighbour_search, nprobe, gpus_per_shard > 0, threads,
                                     query_search)
                       for i, p in enumerate(self.paths)]
        infos = self._gather([a.info.remote() for a in self.actors], "open")
        self.offsets = np.array([i["offset"] for i in infos] + [infos[0]["total"]], dtype=np.int64)
        self.dim, self.dtype = infos[0]["dim"], infos[0]["dtype"]

    @classmethod
    def create(cls, bank: np.ndarray, directory: str | Path, num_shards: int,
               sizes: list[int] | None = None, dtype: str = "float32", by_fingerprint: bool = False,
               **kw) -> ShardedBank:
        """Cut `bank` (n, d) into shard files under `directory` and open them.

        Args:
            bank: The memory bank.
            directory: Where the shard files are written.
            num_shards: Number of shards (and actors).
            sizes: Points per shard; None lets `write_shards` split the bank.
            dtype: Storage dtype of the shard files, "float32" or "float16".
            by_fingerprint: Write to `directory/<bank fingerprint>/`, so banks never share files.
            **kw: Keyword arguments of `ShardedBank`.

        Returns:
            The opened `ShardedBank`.
        """
        return cls(write_shards(bank, directory, num_shards, sizes, dtype, by_fingerprint), **kw)

    def _check_shards(self, headers: list[dict]) -> None:
        """The files' headers: one bank, each shard once, in bank order (contents: see `BankShard`)."""
        first = headers[0]
        for header, path in zip(headers, self.paths):
            if header["bank_id"] != first["bank_id"] or header["total"] != first["total"]:
                raise ModelFileError(f"{path}: belongs to another bank ({header['bank_id']}) than "
                                     f"{self.paths[0]} ({first['bank_id']})")
        held = [h["shard"] for h in headers]
        if sorted(held) != list(range(first["shards"])):
            raise ModelFileError(f"{self.paths}: hold shards {held} of the {first['shards']} of bank "
                                 f"{first['bank_id']} (a shard is missing or repeated)")
        if held != sorted(held):
            raise ModelFileError(f"{self.paths}: shard files must be given in bank order")

    def _gather(self, refs: list, what: str, shards: list[int] | None = None) -> list:
        """ray.get, turning an actor lost beyond its restarts, or one whose constructor refused its
        file (a shard rewritten by another bank), into an error that names the shard."""
        import ray
        from ray.exceptions import RayActorError

        out = []
        for shard, ref in zip(shards if shards is not None else range(len(refs)), refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as exc:
                if exc.actor_init_failed:
                    # Ray passes the constructor's exception on as text only, its traceback ending in
                    # "module.Class: message" (load_shard's names the file and both fingerprints)
                    last = str(exc).strip().splitlines()[-1]
                    raised = re.fullmatch(r"([\w.]+): (.*)", last)
                    refused = raised is not None and raised[1].endswith(".ModelFileError")
                    raise (ModelFileError if refused else RebError)(
                        f"bank shard {shard} could not (re)load its file during {what}; no scores were "
                        f"returned: {raised[2] if refused else last}") from exc
                raise RebError(f"{self.paths[shard]}: bank shard {shard} failed during {what} and could not "
                               f"be restarted; no scores were returned ({type(exc).__name__})") from exc
        return out

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        """Number of shard actors (0 after `close`)."""
        return len(self.actors)

    def shard_pids(self) -> list[int]:
        """Return the process id of each shard's actor, in shard order (a restart changes it)."""
        return [i["pid"] for i in self._gather([a.info.remote() for a in self.actors], "info")]

    def search(self, queries: np.ndarray, k: int, batch_size: int | None = None, progress: str | None = None,
               approximate: bool = False, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Find the K nearest bank points over all shards; batches are pipelined, one in flight ahead.

        Args:
            queries: Query vectors (m, d).
            k: Neighbours per query, capped at the bank's size.
            batch_size: Queries per round; None uses the bank's `batch_size`.
            progress: Progress-bar label; None shows no bar.
            approximate: Take the shards' candidates as the density build does (neighbour_search).
            exact: Exact candidates on every shard, whatever the settings (recall's reference).

        Returns:
            ``(dist2, ids)``, each (m, k): squared L2 distances, nearest first, and global ids.

        Raises:
            RebError: If a shard fails beyond its restarts.
        """
        import ray

        queries = as_float32(queries)
        k = min(k, len(self))
        batch_size = batch_size or self.batch_size
        dist = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        starts = list(range(0, len(queries), batch_size))

        def submit(s):
            q = ray.put(queries[s:s + batch_size])
            return [a.search.remote(q, k, approximate, exact) for a in self.actors]

        pending = submit(starts[0]) if starts else None
        for j, s in enumerate(progress_bar(starts, desc=progress, disable=progress is None or len(starts) < 2,
                                   leave=False)):
            ahead = submit(starts[j + 1]) if j + 1 < len(starts) else None
            parts = self._gather(pending, "search")
            dist[s:s + batch_size], ids[s:s + batch_size] = merge_nearest(parts, k)
            pending = ahead
        return dist, ids

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """Return the index of the shard holding each global id (same shape as `ids`)."""
        return np.searchsorted(self.offsets, ids, side="right") - 1

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Return float32 vectors by global id, fetched from the shards that hold them.

        Returns:
            An array of shape ``ids.shape + (d,)``.
        """
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        out = np.empty((len(flat), self.dim), np.float32)
        owner = self.shard_of(flat)
        shards = np.unique(owner).tolist()
        refs = [self.actors[s].vectors.remote(flat[owner == s]) for s in shards]
        for s, got in zip(shards, self._gather(refs, "vector lookup", shards)):
            out[owner == s] = got
        return out.reshape(*ids.shape, self.dim)

    def search_bank_points(self, point_ids: np.ndarray, k: int,
                           progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`Index.search_bank_points` over the WHOLE bank, whichever shard each point lives on: the
        vectors are fetched from their shards (in chunks) and searched on every shard, candidates
        from the approximate indexes where the bank has them."""
        point_ids = np.asarray(point_ids, dtype=np.int64)
        check_self_search(k, len(self))
        dist = np.empty((len(point_ids), k), np.float32)
        ids = np.empty((len(point_ids), k), np.int64)
        chunk = 4 * self.batch_size  # bounds the vectors fetched to the driver at once
        starts = range(0, len(point_ids), chunk)
        for s in progress_bar(starts, desc=progress, disable=progress is None or len(starts) < 2, leave=False):
            p = point_ids[s:s + chunk]
            d, i = self.search(self.vectors(p), k + 1, approximate=True)
            dist[s:s + chunk], ids[s:s + chunk] = drop_self(d, i, p, k)
        return dist, ids

    def close(self) -> None:
        """Kill the shard actors, and shut Ray down if this bank started it."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> ShardedBank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sharded_index_factory(bank: BankConfig, shard_dir: str | Path | None) -> IndexFactory | None:
    """The factory of a bank on `bank.shards` Ray actors, or None when bank.shards < 1 (in process).

    The factory writes the bank's shard files to `shard_dir/<bank fingerprint>/` and opens a
    `ShardedBank` over them.

    Raises:
        ValueError: sharded without a folder for the shard files.
    """
    if bank.shards < 1:
        return None
    if not shard_dir:
        raise ValueError("a sharded bank needs a folder for its shard files (bank.shard_dir)")

    def sharded(vectors: np.ndarray) -> ShardedBank:
        # by fingerprint: distinct banks given one folder must not overwrite each other's files,
        # which a restarted actor would then load
        return ShardedBank.create(vectors, shard_dir, bank.shards, dtype=bank.dtype, by_fingerprint=True,
                                  neighbour_search=bank.neighbour_search, nprobe=bank.nprobe,
                                  query_search=bank.query_search,
                                  cpus_per_shard=bank.shard_cpus, gpus_per_shard=bank.shard_gpus)

    return sharded


def sharded_placement(bank: BankConfig, output_dir: str | Path) -> BankPlacement:
    """category -> its bank's factory: on Ray actors with files in `shard_folder` when bank.shards >= 1,
    else None (in process). What the commands hand the pipelines."""
    return lambda category: sharded_index_factory(bank, shard_folder(bank, output_dir, category))
