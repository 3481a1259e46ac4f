"""The point an OOM boot is saved at, and where each restored copy of it learns its plan.

With ``--oom-from DEV`` the probe, once imported and before its ``hello``, prints
:data:`MARK` on stderr (the guest's console) and polls DEV, a small virtio disk of the host's,
until it holds a plan. The host saves the guest while it polls (QEMU migration to a file,
kmatrix.backends.qmp) and starts every OOM lane of the cell from that file, each with a plan
disk of its own: one kernel boot per cell instead of one per lane. The saved boot's own disk
stays empty; it is never resumed.
"""

from __future__ import annotations

import mmap
import os
import sys
import time

MARK = "kmatrix-probe: ready to be saved, waiting for the OOM plan"
#: A plan disk's first block: MAGIC, the --oom argument, a newline; zeros after it.
MAGIC = b"KMXPLAN "
BLOCK = 4096
POLL_S = 0.02


def parse_block(block: bytes) -> str | None:
    """The --oom argument a plan disk's first block holds, or None while it holds none."""
    if not block.startswith(MAGIC) or b"\n" not in block:
        return None
    return block[len(MAGIC) : block.index(b"\n")].decode("ascii")


def await_plan(path: str, timeout: float) -> str:
    """Say the probe is ready, then poll ``path`` until it holds a plan; that plan.

    O_DIRECT: the guest's own page cache is saved with it and would go on showing the saved
    boot's empty disk to a restored copy. SystemExit(2) after ``timeout`` seconds.
    """
    if not path:
        sys.stderr.write("probe: --oom-from: no plan disk (the guest found no kmxplan disk)\n")
        raise SystemExit(2)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    sys.stderr.write(MARK + "\n")
    sys.stderr.flush()
    deadline = time.monotonic() + timeout
    try:
        while True:
            os.preadv(fd, [buf], 0)
            plan = parse_block(bytes(buf))
            if plan is not None:
                return plan
            if time.monotonic() > deadline:
                sys.stderr.write(f"probe: no OOM plan on {path} after {timeout:.0f} s\n")
                raise SystemExit(2)
            time.sleep(POLL_S)
    finally:
        os.close(fd)
