"""Where an OOM experiment happens: the whole machine, or a v2 / v1 memory cgroup.

The guest mounts cgroup2 at /sys/fs/cgroup and enables nothing. A v1 ``memory``
hierarchy can only be mounted while the memory controller has no live csses on the v2
hierarchy (kernel/cgroup/cgroup.c ``rebind_subsystems()`` returns -EBUSY otherwise), so
the v1 experiment runs first in its boot and gives the controller back (umount) before
the v2 experiments enable ``+memory``. Kernels built without CONFIG_MEMCG_V1 (an option
since 6.10) refuse the v1 mount: the experiment is then "not available", with the error.

In a container (``--oom-memcg container``) the probe cannot create cgroups (the cgroupfs
is read-only without privileges): the experiment's memory cgroup is the container's own,
its limit the container's ``--memory``, and the harness shares it with the roles
(:func:`make_container`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field

import system
from accounting import parse_flat_keyed, read_int, read_text
from system import write_text

V1_MOUNT = "/run/kmx-memcg-v1"
#: How long to wait for a v1 root to release the memory controller after umount
#: (the root is destroyed asynchronously, after an RCU grace period).
REBIND_TIMEOUT = 5.0
#: v1 reports "no limit" as PAGE_COUNTER_MAX in bytes (~2**63); anything this big is none.
NO_LIMIT = 1 << 60
LIMIT_FILE = {"v2": "memory.max", "v1": "memory.limit_in_bytes"}


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
    owned: bool = True  # False: the container's own cgroup, never removed by us

    @property
    def procs(self) -> str | None:
        """The cgroup.procs file roles write their pid to."""
        return os.path.join(self.path, "cgroup.procs") if self.path else None

    def current(self) -> int | None:
        """memory.current (v2) / memory.usage_in_bytes (v1) in bytes."""
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        return read_int(os.path.join(self.path, name)) if self.path else None

    def stat(self, key: str) -> int | None:
        """One counter of memory.stat (``shmem`` has that name in v1 and v2), in bytes."""
        if not self.path:
            return None
        try:
            return parse_flat_keyed(read_text(os.path.join(self.path, "memory.stat"))).get(key)
        except OSError:
            return None

    def events(self) -> dict[str, int]:
        """memory.events (v2) or memory.oom_control's counters (v1)."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        if not self.path:
            return {}
        try:
            return parse_flat_keyed(read_text(os.path.join(self.path, name)))
        except OSError:
            return {}


def enable_v2_memory(root: str) -> None:
    """``+memory`` in the subtree_control of the v2 hierarchy at ``root``, retrying while a
    v1 root lets go of it; Unavailable without a v2 hierarchy there."""
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        raise Unavailable(f"no cgroup2 hierarchy at {root}")
    give_back_v1()
    deadline = time.monotonic() + REBIND_TIMEOUT
    while True:
        try:
            write_text(os.path.join(root, "cgroup.subtree_control"), "+memory")
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"cannot enable +memory in {root}/cgroup.subtree_control: {exc}"
                ) from None
        time.sleep(0.05)


def make_v2(root: str, name: str, limit: int, group: bool) -> Scope:
    """A fresh v2 cgroup ``<root>/kmx-<name>`` with memory.max (and memory.oom.group)."""
    enable_v2_memory(root)
    path = os.path.join(root, f"kmx-{name}")
    system.remove_cgroup(path)
    try:
        os.mkdir(path)
        write_text(os.path.join(path, "memory.max"), str(limit))
        if group:
            write_text(os.path.join(path, "memory.oom.group"), "1")
    except OSError as exc:
        system.remove_cgroup(path)
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
    system.remove_cgroup(path)
    try:
        os.mkdir(path)
        write_text(os.path.join(path, "memory.limit_in_bytes"), str(limit))
    except OSError as exc:
        release(Scope("v1", path, limit, mounted))
        raise Unavailable(f"cannot set up the v1 memory cgroup {path}: {exc}") from None
    return Scope("v1", path, limit, mounted)


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
    cgroups are long released and the umount destroys the v1 root at once. The
    container's own cgroup is left as it was (memory.oom.group put back)."""
    if not scope.owned:
        restore = scope.facts.get("restore_oom_group")
        if scope.path and isinstance(restore, str):
            try:
                write_text(os.path.join(scope.path, "memory.oom.group"), restore)
            except OSError as exc:
                return f"restoring memory.oom.group: {exc}"
        return None
    return system.remove_cgroup(scope.path) if scope.path else None


# ---- the container's own memory cgroup ----------------------------------------------


def parse_limit(text: str) -> int | None:
    """memory.max / memory.limit_in_bytes -> bytes; None for "max" or v1's huge no-limit."""
    text = text.strip()
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < NO_LIMIT else None


def own_memcg(root: str) -> tuple[str, str] | None:
    """(version, directory) of the memory cgroup this process is in, or None.

    In a container that is the container's cgroup: runc mounts it at /sys/fs/cgroup
    (v2) or /sys/fs/cgroup/memory (v1), and system resolves /proc/self/cgroup against
    the mount's root either way (with or without a cgroup namespace).
    """
    found = system._controller_mount(root)
    if found is None:
        return None
    version, mount_dir = found
    return version, system._own_cgroup_dir(version, mount_dir)


def container_limit(root: str) -> int | None:
    """The memory limit of our own cgroup (a container's --memory), or None."""
    found = own_memcg(root)
    if found is None:
        return None
    version, path = found
    try:
        return parse_limit(read_text(os.path.join(path, LIMIT_FILE[version])))
    except OSError:
        return None


def make_container(root: str, version: str, group: bool, harness_protected: bool) -> Scope:
    """The container's own memory cgroup as the experiment's scope.

    The roles need not join it (forked children are in it already) and it is never
    removed. ``version`` is the cgroup version the experiment is named for: a v1 host
    cannot run oom-memcg-v2 in a container and vice versa.
    """
    found = own_memcg(root)
    if found is None:
        raise Unavailable(f"no memory cgroup under {root}")
    have, path = found
    if have != version:
        raise Unavailable(
            f"the container's memory cgroup is {have} (the host's cgroup version), not {version}"
        )
    limit = container_limit(root)
    if limit is None:
        raise Unavailable(f"the container's memory cgroup {path} has no memory limit")
    scope = Scope(version, path, limit, owned=False, facts={"memcg": "container"})
    if group:
        scope.facts["restore_oom_group"] = _set_container_group(path, harness_protected)
    return scope


def _set_container_group(path: str, harness_protected: bool) -> str:
    """memory.oom.group=1 on the container's cgroup; returns the value to put back.

    The harness shares that cgroup: a group kill takes every task but those at
    oom_score_adj -1000 (mm/oom_kill.c oom_kill_memcg_member), so without that
    protection the harness would die with the roles.
    """
    name = os.path.join(path, "memory.oom.group")
    if not os.access(name, os.W_OK):
        raise Unavailable(
            f"{name} is not writable (read-only cgroupfs in an unprivileged container)"
        )
    if not harness_protected:
        raise Unavailable(
            "memory.oom.group=1 on the container's own cgroup would kill the harness too "
            "(it shares the cgroup and cannot set oom_score_adj -1000)"
        )
    old = read_text(name).strip()
    try:
        write_text(name, "1")
    except OSError as exc:
        raise Unavailable(f"cannot set {name}: {exc}") from None
    return old


def give_back_v1() -> None:
    """Umount our v1 memory hierarchy (if mounted) so the controller returns to v2."""
    if not os.path.exists(os.path.join(V1_MOUNT, "memory.limit_in_bytes")):
        return
    _wait_released()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["umount", V1_MOUNT], capture_output=True, timeout=30)
