"""The scenarios' sizes and skip checks, run in the probe before a scenario's child is forked.

A size function gives the bytes a scenario works with (``size_bytes`` of its record); a
check returns a :class:`Skip` (the record's error text and detail) when the scenario must
not run here: no disk, no size limit on shm_dir, too little memory for what it would
write, a read-only /proc/sys, no swap device. ``need_swap`` swaps the device on (the
probe swaps it off again after the scenario).
"""

from __future__ import annotations

import os

import accounting
import oom_scope
import swap
from scenario_actions import OVERCOMMIT
from scenario_types import CHUNK_SIZE, MIB, Settings, Skip
from system import CGROUP_ROOT

OVER_LIMIT_EXTRA = 32 * MIB
#: Refuse to write more than this fraction of MemAvailable (a host /dev/shm may be huge).
MAX_AVAILABLE_FRACTION = 0.75
#: memfd-beyond-half-ram writes this fraction of MemTotal (the thread claims 50 % caps it).
BEYOND_HALF_FRACTION = 0.65
#: ... and needs this much more than that available, for the probe and the kernel.
BEYOND_HALF_MARGIN = 32 * MIB
#: ... and never more than this: beyond it the machine is a host, not a test guest.
BEYOND_HALF_MAX = 4096 * MIB


def need_disk(settings: Settings) -> Skip | None:
    """Skip disk scenarios when disk_dir is not on a real disk filesystem."""
    if settings.disk_problem:
        return Skip("no disk", {"disk_problem": settings.disk_problem})
    return None


def over_limit_size(settings: Settings) -> int:
    """shm size= plus 32 MiB (0 when shm_dir has no size limit)."""
    return settings.shm_size + OVER_LIMIT_EXTRA if settings.shm_size else 0


def need_shm_limit(settings: Settings) -> Skip | None:
    """Skip over-limit scenarios without a limit, or when they would exhaust memory."""
    if not settings.shm_size:
        return Skip(f"no size limit known for {settings.shm_dir}")
    needed = over_limit_size(settings)
    available = accounting.read_meminfo().get("meminfo_MemAvailable")
    if available is not None and needed > available * MAX_AVAILABLE_FRACTION:
        return Skip(
            f"refused: would write {needed} bytes, more than {MAX_AVAILABLE_FRACTION:.0%} "
            f"of MemAvailable {available}",
            {"needed_bytes": needed, "mem_available": available},
        )
    return None


def beyond_half_size(settings: Settings) -> int:
    """~65 % of MemTotal: past the 50 % a tmpfs mount gets by default."""
    total = accounting.mem_total() or 0
    return int(total * BEYOND_HALF_FRACTION) // CHUNK_SIZE * CHUNK_SIZE


def need_room_beyond_half(settings: Settings) -> Skip | None:
    """Refuse where 65 % of MemTotal does not fit: a small guest, or a container whose
    memory limit (not the host's MemTotal) bounds it."""
    size = beyond_half_size(settings)
    if size > BEYOND_HALF_MAX:
        # A host, not a small guest: writing most of its RAM (and, strict, setting its
        # vm.overcommit_memory) would starve everything else running there.
        return Skip(
            f"refused: 65% of MemTotal is {size} bytes, more than the {BEYOND_HALF_MAX} "
            "this scenario writes; it is meant for guests and containers",
            {"needed_bytes": size},
        )
    available = accounting.read_meminfo().get("meminfo_MemAvailable", 0)
    limit = oom_scope.container_limit(CGROUP_ROOT)
    room = min(available, limit) if limit else available
    if size + BEYOND_HALF_MARGIN > room:
        return Skip(
            f"refused: would write {size} bytes (65% of MemTotal); only {room} bytes of "
            "memory are available here",
            {"needed_bytes": size, "room": room, "cgroup_limit": limit},
        )
    return None


def need_sysctl_writable(settings: Settings) -> Skip | None:
    """The strict variant sets vm.overcommit_memory: refuse where /proc/sys is read-only."""
    skip = need_room_beyond_half(settings)
    if skip is None and not os.access(OVERCOMMIT, os.W_OK):
        return Skip(f"refused: {OVERCOMMIT} is not writable here (a container?)")
    return skip


def need_swap(settings: Settings) -> Skip | None:
    """Swap scenarios need the guest's swap disk; they swap it on before BEFORE."""
    problem = swap.swapon(settings.swap_dev)
    return Skip(problem) if problem else None
