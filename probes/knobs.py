"""The system settings that can change an answer, read (and, for one repeat, set) as they are.

Every value is what the running kernel says, never what the harness assumes: a setting
the kernel does not have (vm.memfd_noexec before 6.3, no THP) is ``None``. The probe's
``hello`` record carries all of them, and every OOM repeat those it may change.
"""

from __future__ import annotations

import os
import re

from accounting import meminfo_fields, read_int, read_text
from system import CGROUP_ROOT, Mount, mount_of, write_text

SYSCTL = "/proc/sys"
THP = "/sys/kernel/mm/transparent_hugepage"
#: sysctls under /proc/sys that decide what is charged, what may be allocated and whom
#: the OOM killer picks.
SYSCTLS = {
    "overcommit_memory": "vm/overcommit_memory",
    "overcommit_ratio": "vm/overcommit_ratio",
    "memfd_noexec": "vm/memfd_noexec",
    "nr_hugepages": "vm/nr_hugepages",
    "oom_kill_allocating_task": "vm/oom_kill_allocating_task",
    "panic_on_oom": "vm/panic_on_oom",
    "swappiness": "vm/swappiness",
}
#: Knobs an OOM repeat records with itself (the ones an experiment may set).
OOM_KNOBS = ("oom_kill_allocating_task", "panic_on_oom", "overcommit_memory", "swap_total")


def selected(text: str) -> str | None:
    """``always within_size advise [never] deny force`` -> ``never`` (the bracketed one)."""
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else None


def _thp(name: str) -> str | None:
    try:
        return selected(read_text(os.path.join(THP, name)))
    except OSError:
        return None


def cgroup2_options(root: str = CGROUP_ROOT, mounts: list[Mount] | None = None) -> str | None:
    """The cgroup2 hierarchy's own mount options (mountinfo's super options): some change
    memcg answers (memory_localevents: memory.events counts this cgroup only;
    memory_recursiveprot), favordynmods how fast a task moves between cgroups. None where
    ``root`` (the probe's --cgroup-root) is no cgroup2 mount."""
    try:
        mount = mount_of(root, mounts)
    except OSError:
        return None
    if mount is None or mount.fstype != "cgroup2" or mount.mount_point != os.path.realpath(root):
        return None
    return mount.super_options


def vcpus() -> int | None:
    """CPUs this process may run on (what the guest got from QEMU's -smp)."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count()


def read_knobs(cgroup_root: str = CGROUP_ROOT) -> dict[str, object]:
    """Every knob, as the kernel reports it now."""
    try:
        meminfo = meminfo_fields()
    except OSError:
        meminfo = {}
    found: dict[str, object] = {
        "vcpus": vcpus(),
        "swap_total": meminfo.get("SwapTotal"),
        "thp_enabled": _thp("enabled"),
        "shmem_enabled": _thp("shmem_enabled"),
        "cgroup2_options": cgroup2_options(cgroup_root),
    }
    found |= {key: read_int(os.path.join(SYSCTL, path)) for key, path in SYSCTLS.items()}
    return found


def oom_knobs() -> dict[str, object]:
    """The knobs recorded with every OOM repeat."""
    knobs = read_knobs()
    return {key: knobs.get(key) for key in OOM_KNOBS}


def set_sysctl(path: str, value: object) -> None:
    """Write a sysctl (``vm/oom_kill_allocating_task``); None (not readable before) is a no-op."""
    if value is None:
        return
    write_text(os.path.join(SYSCTL, path), str(value))


#: sysctls an accounting scenario sets for itself (memfd-hugetlb, memfd-beyond-half-ram-strict).
SCENARIO_SYSCTLS = ("vm/nr_hugepages", "vm/overcommit_memory")


def snapshot(paths: tuple[str, ...]) -> dict[str, int | None]:
    """The values of some sysctls (``vm/overcommit_memory``) now."""
    return {path: read_int(os.path.join(SYSCTL, path)) for path in paths}


def restore(saved: dict[str, int | None]) -> dict[str, int]:
    """Put back every sysctl that differs from ``saved``; returns the ones it had to."""
    changed = {}
    for path, value in saved.items():
        now = read_int(os.path.join(SYSCTL, path))
        if value is not None and now != value:
            try:
                set_sysctl(path, value)
                changed[path] = now if now is not None else -1
            except OSError:
                changed[path] = -1
    return changed
