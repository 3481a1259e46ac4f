"""The guard: a tiny process between kmatrix and each QEMU that QEMU cannot outlive.

Run as ``python3 -I -S guard.py LIFELINE_FD DEADLINE_S CMD...`` (stdlib only, no kmatrix
imports, so it starts in milliseconds). It forks CMD and then waits for the first of:

- CMD exits: the guard exits with CMD's status (128 + N for a signal N);
- the lifeline pipe hits EOF: every write end is held by kmatrix, so EOF means kmatrix is
  gone (even ``kill -9``), and the guard kills CMD;
- DEADLINE_S seconds pass: the guard kills CMD, whatever kmatrix is doing (a stopped or
  hung kmatrix cannot keep a guest past its cell's timeout).

CMD additionally gets PR_SET_PDEATHSIG(SIGKILL) towards the guard. That is safe here: the
guard is single-threaded, so the "parent" whose death fires it is the guard itself (in the
multi-threaded kmatrix it would be the forking *thread*). kmatrix's own ``killpg`` reaches
both, since CMD stays in the guard's process group.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
# Exit status when the guard itself killed CMD (deadline or lifeline): 128 + SIGKILL.
KILLED = 128 + signal.SIGKILL


def _child(argv: list[str], guard_pid: int, lifeline: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != guard_pid:  # the guard died before prctl took effect
        os._exit(KILLED)
    os.close(lifeline)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, f"kmatrix guard: cannot run {argv[0]}: {exc.strerror}\n".encode())
        os._exit(127)


def _status(wait_status: int) -> int:
    """CMD's exit code; when a signal killed CMD, the guard dies of the same signal.

    So kmatrix sees what it would have seen without the guard (e.g. ``-9`` for a QEMU
    someone killed).
    """
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        if -code != signal.SIGKILL:  # SIGKILL's disposition cannot (and need not) be set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # the signal was blocked or ignored: report it as a shell would
    return code


def main(args: list[str]) -> int:
    """Run CMD under the lifeline and the deadline; return the exit status to exit with."""
    lifeline, deadline, argv = int(args[0]), time.monotonic() + float(args[1]), args[2:]
    guard_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(argv, guard_pid, lifeline)
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _status(wait_status)
        left = deadline - time.monotonic()
        readable, _, _ = select.select([lifeline], [], [], max(0.0, min(left, 0.2)))
        if readable or left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return KILLED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
