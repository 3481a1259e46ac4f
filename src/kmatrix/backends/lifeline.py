"""Child processes (QEMU, container reapers) that cannot outlive kmatrix, not even ``kill -9``.

One pipe per kmatrix process: kmatrix keeps the only write end (non-inheritable, so no
other child holds a copy) and hands the read end to every guard. When kmatrix dies, for
whatever reason, the kernel closes the write end and every guard sees EOF at once.

PR_SET_PDEATHSIG alone is not enough here: it fires when the *thread* that forked dies,
and kmatrix forks from cell threads; a preexec_fn calling prctl in a multi-threaded
process may also deadlock. The guard (``kmatrix.backends.guard``) is single-threaded, so it can
use PR_SET_PDEATHSIG towards itself safely.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_GUARD = Path(__file__).with_name("guard.py")
_REAPER = Path(__file__).with_name("reaper.py")
_LOCK = threading.Lock()
_PIPE: tuple[int, int] | None = None


def lifeline_fd() -> int:
    """The read end of this process's lifeline pipe (created on first use)."""
    global _PIPE
    with _LOCK:
        if _PIPE is None:
            read, write = os.pipe()  # both non-inheritable (PEP 446)
            _PIPE = (read, write)
        return _PIPE[0]


def guarded(argv: list[str], deadline_s: float) -> tuple[list[str], tuple[int, ...]]:
    """``argv`` wrapped in the guard, and the fds to pass to it (``Popen(pass_fds=...)``).

    The guard kills the command when kmatrix dies or ``deadline_s`` seconds have passed.
    """
    fd = lifeline_fd()
    wrapper = [sys.executable, "-I", "-S", str(_GUARD), str(fd), f"{deadline_s:.1f}"]
    return [*wrapper, *argv], (fd,)


@contextmanager
def reaper(cleanup: list[str], deadline_s: float) -> Iterator[None]:
    """Within the block, ``cleanup`` (e.g. ``docker rm -f ID``) runs if kmatrix dies.

    It also runs after ``deadline_s`` seconds, so nothing outlives its timeout even when
    kmatrix hangs. Leaving the block (kmatrix cleaned up itself) kills the reaper unused.
    """
    fd = lifeline_fd()
    argv = [sys.executable, "-I", "-S", str(_REAPER), str(fd), f"{deadline_s:.1f}", *cleanup]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C on the terminal must not kill it before kmatrix
        pass_fds=(fd,),
    )
    try:
        yield
    finally:
        proc.kill()
        proc.wait()
