"""Where an OOM experiment happens: the whole machine, or a v2 / v1 memory cgroup.

The guest mounts cgroup2 at /sys/fs/cgroup and enables nothing. A v1 ``memory``
hierarchy can only be mounted while the memory controller has no live csses on the v2
hierarchy (kernel/cgroup/cgroup.c ``rebind_subsystems()`` returns -EBUSY otherwise), so
the v1 experiment runs first in its boot and gives the controller back (umount) before
the v2 experiments enable ``+memory``. Kernels built without CONFIG_MEMCG_V1 (an option
since 6.10) refuse the v1 mount: the experiment is then "not available", with the error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from dataclasses import dataclass, field

from accounting import parse_flat_keyed, read_text

V1_MOUNT = "/run/kmx-memcg-v1"
#: How long to wait for a v1 root to release the memory controller after umount
#: (the root is destroyed asynchronously, after an RCU grace period).
REBIND_TIMEOUT = 5.0


class Unavailable(Exception):
    """This kernel / system cannot run the experiment; the text says why."""


@dataclass
class Scope:
    """A memory cgroup prepared for one repeat (``version`` "none" = global OOM)."""

    version: str = "none"  # none | v2 | v1
    path: str | None = None
    limit: int | None = None
    mounted: str | None = None  # v1 mount point to umount afterwards
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def procs(self) -> str | None:
        """The cgroup.procs file roles write their pid to."""
        return os.path.join(self.path, "cgroup.procs") if self.path else None

    def current(self) -> int | None:
        """memory.current (v2) / memory.usage_in_bytes (v1) in bytes."""
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        return _read_int(self.path, name)

    def events(self) -> dict[str, int]:
        """memory.events (v2) or memory.oom_control's counters (v1)."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        if not self.path:
            return {}
        try:
            return parse_flat_keyed(read_text(os.path.join(self.path, name)))
        except OSError:
            return {}


def _read_int(directory: str | None, name: str) -> int | None:
    if not directory:
        return None
    try:
        return int(read_text(os.path.join(directory, name)))
    except (OSError, ValueError):
        return None


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _enable_v2_memory(root: str) -> None:
    """``+memory`` in the root's subtree_control, retrying while a v1 root lets go of it."""
    give_back_v1()
    deadline = time.monotonic() + REBIND_TIMEOUT
    while True:
        try:
            _write(os.path.join(root, "cgroup.subtree_control"), "+memory")
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"cannot enable +memory in {root}/cgroup.subtree_control: {exc}"
                ) from None
        time.sleep(0.05)


def make_v2(root: str, name: str, limit: int, group: bool) -> Scope:
    """A fresh v2 cgroup ``<root>/kmx-<name>`` with memory.max (and memory.oom.group)."""
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        raise Unavailable(f"no cgroup2 hierarchy at {root}")
    _enable_v2_memory(root)
    path = os.path.join(root, f"kmx-{name}")
    remove(path)
    try:
        os.mkdir(path)
        _write(os.path.join(path, "memory.max"), str(limit))
        if group:
            _write(os.path.join(path, "memory.oom.group"), "1")
    except OSError as exc:
        remove(path)
        raise Unavailable(f"cannot set up the v2 memory cgroup {path}: {exc}") from None
    return Scope("v2", path, limit)


def _mount_v1() -> tuple[str, str | None]:
    """(mount point of a v1 memory hierarchy, what to umount afterwards or None)."""
    existing = "/sys/fs/cgroup/memory"
    if os.path.exists(os.path.join(existing, "memory.limit_in_bytes")):
        return existing, None
    if os.path.exists(os.path.join(V1_MOUNT, "memory.limit_in_bytes")):
        return V1_MOUNT, V1_MOUNT  # ours, from the previous repeat
    os.makedirs(V1_MOUNT, exist_ok=True)
    run = subprocess.run(
        ["mount", "-t", "cgroup", "-o", "memory", "kmx-memcg-v1", V1_MOUNT],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if run.returncode != 0:
        listed = "memory" in read_text("/proc/cgroups")
        raise Unavailable(
            f"mounting the v1 memory controller failed: {(run.stderr or run.stdout).strip()} "
            f"(memory {'is' if listed else 'is not'} listed in /proc/cgroups)"
        )
    return V1_MOUNT, V1_MOUNT


def make_v1(name: str, limit: int) -> Scope:
    """A v1 memory cgroup with memory.limit_in_bytes; mounts the hierarchy if needed."""
    mount, mounted = _mount_v1()
    path = os.path.join(mount, f"kmx-{name}")
    remove(path)
    try:
        os.mkdir(path)
        _write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
    except OSError as exc:
        release(Scope("v1", path, limit, mounted))
        raise Unavailable(f"cannot set up the v1 memory cgroup {path}: {exc}") from None
    return Scope("v1", path, limit, mounted)


def remove(path: str, timeout: float = 3.0) -> str | None:
    """rmdir a cgroup, retrying while its last tasks exit; an error text or None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return f"rmdir {path}: {exc}"
        time.sleep(0.02)


def memory_cgroups() -> int | None:
    """num_cgroups of the memory controller in /proc/cgroups (dying ones included)."""
    try:
        for line in read_text("/proc/cgroups").splitlines():
            fields = line.split()
            if fields and fields[0] == "memory":
                return int(fields[2])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _wait_released(timeout: float = REBIND_TIMEOUT) -> None:
    """Wait until our removed v1 cgroup is really gone (only the root is left).

    ``cgroup_kill_sb()`` destroys a v1 root at umount only if it has no children at that
    moment; a removed cgroup stays a child until its css is released (asynchronously,
    after the last charge is gone). Umounting earlier would leave the root, and with it
    the memory controller, bound to v1 for good, and the v2 experiments unable to run.
    """
    deadline = time.monotonic() + timeout
    while (memory_cgroups() or 1) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def release(scope: Scope) -> str | None:
    """Remove the cgroup. A v1 hierarchy we mounted stays for the next v1 repeat; the
    first v2 experiment gives it back (:func:`give_back_v1`), by when the removed
    cgroups are long released and the umount destroys the v1 root at once."""
    return remove(scope.path) if scope.path else None


def give_back_v1() -> None:
    """Umount our v1 memory hierarchy (if mounted) so the controller returns to v2."""
    if not os.path.exists(os.path.join(V1_MOUNT, "memory.limit_in_bytes")):
        return
    _wait_released()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["umount", V1_MOUNT], capture_output=True, timeout=30)
