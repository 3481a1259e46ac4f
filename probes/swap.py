"""Swap for the scenarios and OOM experiments about it: on, off, and pushing a memfd out.

The guest's init formats a virtio disk as swap (``--swap-dev``); nothing swaps it on but
the code here, so every other scenario and experiment runs without swap and stays
comparable across kernels. busybox provides swapon/swapoff in the guest.
"""

from __future__ import annotations

import mmap
import os
import subprocess

from accounting import read_text
from system import CGROUP_ROOT, write_text

SWAP_TIMEOUT = 60
#: uapi asm-generic/mman-common.h; bookworm's Python 3.11 mmap module does not export it.
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)


def active(dev: str) -> bool:
    """``dev`` is listed in /proc/swaps."""
    try:
        return any(line.split()[:1] == [dev] for line in read_text("/proc/swaps").splitlines())
    except OSError:
        return False


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SWAP_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{argv[0]}: {exc}"
    return None if done.returncode == 0 else f"{' '.join(argv)}: {done.stderr.strip()}"


def swapon(dev: str | None) -> str | None:
    """Swap on ``dev`` (once); returns why it could not, or None."""
    if not dev:
        return "no swap device (guest.swap is 0, or not a VM)"
    return None if active(dev) else _run(["swapon", dev])


def swapoff(dev: str | None) -> str | None:
    """Swap off ``dev`` (what is in swap is read back first); returns an error or None."""
    return _run(["swapoff", dev]) if dev and active(dev) else None


def own_cgroup_reclaim() -> str | None:
    """memory.reclaim of this process's v2 cgroup (5.19+), or None where there is none."""
    try:
        for line in read_text("/proc/self/cgroup").splitlines():
            if line.startswith("0::"):
                path = os.path.join(CGROUP_ROOT, line[3:].strip().lstrip("/"))
                name = os.path.join(path, "memory.reclaim")
                return name if os.path.exists(name) else None
    except OSError:
        return None
    return None


def push_out(fd: int, size: int, mapping: mmap.mmap | None = None) -> str:
    """Move a memfd's pages to swap with MADV_PAGEOUT; returns how.

    MADV_PAGEOUT (5.4+: every kernel of the default matrix) reclaims exactly the pages of
    one mapping that only this process maps (mm/madvise.c madvise_cold_or_pageout_pte_range),
    so nothing else of the process is swapped: the mapped memfd's own ``mapping``, or a
    temporary populated one for a memfd that is otherwise never mapped. memory.reclaim of
    our cgroup (5.19+) is only the fallback: it reclaims the whole cgroup, the
    interpreter's anon pages too, which would make kernels differ by method, not behaviour.
    """
    try:
        if mapping is not None:
            mapping.madvise(MADV_PAGEOUT)
            return "MADV_PAGEOUT"
        # MADV_PAGEOUT walks page tables: the temporary mapping must have the pages mapped.
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        try:
            m.madvise(MADV_PAGEOUT)
        finally:
            m.close()
        return "MADV_PAGEOUT"
    except OSError:
        reclaim = own_cgroup_reclaim()
        if reclaim is None:
            raise
        write_text(reclaim, str(size))
        return "memory.reclaim"
