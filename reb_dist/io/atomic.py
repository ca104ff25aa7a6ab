"""The one way reb-dist writes a file: into a temporary folder beside it, then renamed into place.

A crashed or killed run never leaves a half-written model, shard, result or PNG (that MLflow or a
resumed sweep would pick up). The temporary is a folder `.<name>.<host>.<pid>.<random>.tmp` (host: a
hash of this machine and its pid namespace), so whatever a writer makes on its way (safetensors'
own hidden `.tmpXXXXXX`, 40 MB for a model) lies inside it and goes with it. The next write into the
same folder, from any process, removes the temporaries of dead writers: those of this host whose
pid is gone, and those of other hosts untouched for STALE_SECONDS; never a live writer's.

The file gets the usual permissions (0644 under the default umask), whatever the writer used:
safetensors' temporary is 0600, which made models from `reb fit` unreadable to other users.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# another host's temporary untouched this long is a dead writer's (its pid cannot be checked here)
STALE_SECONDS = 600
_RESCAN_SECONDS = 60  # a folder is searched for leftovers at most this often per process
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
_OLD_TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")  # the earlier name: a file, no host
_scanned: dict[Path, float] = {}


def host_id() -> str:
    """This machine and pid namespace ("gpu-3/4026531836"): where a pid names one process. Two
    containers of one host share a hostname but not their pids."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}" if namespace else socket.gethostname()


_HOST = hashlib.sha1(host_id().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        # "<pid> (<command>) <state> ...": the command may hold spaces and parentheses
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path`.

    Args:
        path: the file to create or replace; its folder is created if missing.
        write: writes the whole file to the temporary path it is given (named as `path`, in a
            temporary folder).

    Returns:
        `path` as a Path. On any error the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent)
    folder = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    folder.mkdir()  # mode 0777 less the umask: the file's mode below, without asking for the umask
    tmp = folder / path.name
    try:
        write(str(tmp))
        os.chmod(tmp, stat.S_IMODE(folder.stat().st_mode) & 0o666)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def copy_atomic(source: str | Path, path: str | Path) -> Path:
    """Copy the file `source` to `path` atomically; returns `path`."""
    return write_atomic(path, lambda tmp: shutil.copyfile(source, tmp))


def remove_dead_temporaries(folder: str | Path, force: bool = False) -> list[Path]:
    """Remove the temporaries `write_atomic` left in `folder` when its writer was killed.

    Only names of this module's pattern are touched: this host's when their pid is gone, other
    hosts' (and the old pid-only names) when nothing in them changed for STALE_SECONDS.

    Args:
        folder: the folder to clean.
        force: search it even if this process did within the last minute.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    now = time.monotonic()
    if not force and now - _scanned.get(folder, -_RESCAN_SECONDS) < _RESCAN_SECONDS:
        return []
    _scanned[folder] = now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if (match := _TEMPORARY.fullmatch(entry.name)) and match["host"] == _HOST:
            dead = not pid_alive(int(match["pid"]))
        elif match or _OLD_TEMPORARY.fullmatch(entry.name):
            dead = time.time() - _last_change(Path(entry.path)) > STALE_SECONDS
        else:
            continue
        if dead:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)  # another process may have removed it first
            removed.append(path)
    return removed


def _last_change(path: Path) -> float:
    """The newest mtime of `path` and what it holds (a writer filling a file inside changes only
    that file's)."""
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            times += [p.stat().st_mtime for p in path.iterdir()]
        return max(times)
    except OSError:  # removed meanwhile: nothing to do
        return time.time()


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock, between processes, on the file `path` (created) for the block;
    waits while another process holds it, or with `wait=False` raises BlockingIOError at once. The
    lock goes with the process, so a killed holder never leaves it taken."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        from filelock import FileLock, Timeout  # a dependency of torch and ray, so always installed

        try:
            lock = FileLock(str(path), timeout=-1 if wait else 0)
            lock.acquire()
        except Timeout as exc:
            raise BlockingIOError(f"{path} is locked by another process") from exc
        try:
            yield
        finally:
            lock.release()
        return
    with open(path, "a") as handle:  # "a": create it without emptying anyone's
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BlockingIOError(f"{path} is locked by another process") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_alone(path: str | Path, busy: str) -> Iterator[None]:
    """Hold `file_lock(path)` for the block, or raise RebError(busy) at once when another process
    holds it: for work that two processes must not do at once (one fine-tuning run, one sweep folder)."""
    from reb_dist.errors import RebError

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(path, wait=False))
        except BlockingIOError:
            raise RebError(busy) from None
        yield
