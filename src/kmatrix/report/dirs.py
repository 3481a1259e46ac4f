"""Report directories: a plain name under reports/, one run at a time, old results kept.

``--name`` becomes ``reports/NAME/`` and ``CACHE/work/NAME/``, and kmatrix deletes and
rewrites files in both, so a name must never reach outside them: no ``/``, no ``..``, no
absolute path. Two runs of one name would interleave their writes and could put a damaged
cell into the result cache, so each run holds an exclusive ``flock`` on both directories
(released by the kernel when the process dies, even on ``kill -9``: no stale lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from kmatrix.config import NAME_RE
from kmatrix.errors import InfraError, RunLocked, UserError
from kmatrix.results.contract import Cell
from kmatrix.results.schema import load_results

#: The longest name a report directory may have (characters).
MAX_NAME = 100
LOCK_FILE = ".kmatrix.lock"


def check_report_name(name: str, option: str = "--name") -> str:
    """``name`` if it is a plain directory name; else UserError naming the fix."""
    if not NAME_RE.match(name) or len(name) > MAX_NAME or ".." in name:
        raise UserError(
            f"{option} {name!r}: use a plain name of letters, digits and . _ + - (at most 100, "
            "no '/' or '..'); it becomes a directory under reports/"
        )
    return name


def _lock_one(directory: Path, what: str) -> int:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except NotADirectoryError:
        raise UserError(f"{directory}: a file is in the way of the {what}; move it") from None
    except OSError as exc:
        raise InfraError(
            f"{directory}: cannot create the {what} ({exc.strerror}); check its permissions"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise InfraError(f"{directory}: cannot lock the {what} ({exc.strerror})") from None
        raise RunLocked(
            f"another kmatrix run (pid {holder}) is using the {what} {directory}; wait for it "
            "to finish, or give this run another --name"
        ) from None
    # The pid is for the other run's message only; a full disk must not stop the run here.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def run_lock(out_dir: Path, work_dir: Path) -> Iterator[None]:
    """Hold the report directory and the work directory of one run exclusively."""
    fds = [_lock_one(out_dir, "report directory")]
    try:
        fds.append(_lock_one(work_dir, "work directory"))
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing releases the flock; the file (and pid) may stay


def previous_cells(
    out_dir: Path, names: list[str], log: Callable[[str], None] = lambda _: None
) -> list[Cell]:
    """Cells of the last run of this name for ``names``, marked as carried over.

    A new run saves after every cell; until a kernel's new cell is in, its previous one
    stays readable (flagged ``carried_over``), so an interrupted run never leaves the name
    with fewer results than before. A previous file kmatrix cannot read (an older format, or
    damaged) carries nothing over; it is kept as results.unreadable.json, and ``log`` says so.
    """
    path = out_dir / "results.json"
    if not path.is_file():
        return []
    try:
        old = load_results(path)
    except UserError as exc:
        kept = path.with_name("results.unreadable.json")
        shutil.copyfile(path, kept)
        log(f"{exc}; kept as {kept}, this run starts without its cells")
        return []
    started = old.get("run", {}).get("started")
    keep = [c for c in old.get("cells", []) if c.get("id") in names]
    return [c | {"carried_over": f"from the run started {started}"} for c in keep]


@contextlib.contextmanager
def disk_errors(where: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, permissions) into one clear InfraError.

    Finished cells are in the result cache before any report is written, so the message
    can promise that rerunning loses nothing measured.
    """
    try:
        yield
    except OSError as exc:
        target = exc.filename or where
        hint = {
            errno.ENOSPC: "free some space",
            errno.EDQUOT: "free some space",
            errno.EROFS: "the file system is read-only; use another reports directory",
            errno.EACCES: "check its permissions",
            errno.EPERM: "check its permissions",
        }.get(exc.errno or 0, "fix the path")
        raise InfraError(
            f"{target}: {exc.strerror or exc}; {hint}, then run the same command "
            "again: finished cells are kept in the result cache"
        ) from None


def usable_cache(path: Path) -> Path:
    """``path`` as a writable cache directory (created), else InfraError naming the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".kmatrix-write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise InfraError(
            f"cache location {path} is not a directory; set KMATRIX_CACHE to a directory"
        ) from None
    except OSError as exc:
        raise InfraError(
            f"cache location {path}: {exc.strerror}; set KMATRIX_CACHE to a writable directory"
        ) from None
    return path
