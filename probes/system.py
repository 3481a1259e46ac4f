"""System facts for the kmatrix probe: mounts, filesystems, cgroups and process groups.

Also the probe's one writer of /proc, /sys and cgroup files (:func:`write_text`) and the
uptime the probe's records carry.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass

from accounting import CGROUP_CURRENT_FILE, read_text, statvfs_total

#: Filesystems that keep their pages in memory: not a "disk" for the disk scenarios.
MEMORY_FS = frozenset({"tmpfs", "ramfs", "rootfs", "devtmpfs", "hugetlbfs", "proc", "sysfs"})

#: Where the probe expects the cgroup hierarchy (its --cgroup-root default).
CGROUP_ROOT = "/sys/fs/cgroup"
#: Name of the directory holding the per-scenario cgroups.
CGROUP_BASE_NAME = "kmatrix"


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_point: str
    root: str
    fstype: str
    source: str
    super_options: str


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space and friends)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/PID/mountinfo text, in mount order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        options = tail[2] if len(tail) > 2 else ""
        mounts.append(
            Mount(_unescape(fields[4]), _unescape(fields[3]), tail[0], _unescape(tail[1]), options)
        )
    return mounts


def _is_under(path: str, top: str) -> bool:
    """True if ``path`` is ``top`` or below it (both absolute and normalised)."""
    return path == top or top == "/" or path.startswith(top.rstrip("/") + "/")


def mount_of(path: str, mounts: list[Mount] | None = None) -> Mount | None:
    """The mount that contains ``path`` (the last, deepest match wins)."""
    if mounts is None:
        mounts = parse_mountinfo(read_text("/proc/self/mountinfo"))
    real = os.path.realpath(path)
    best: Mount | None = None
    for mount in mounts:
        if _is_under(real, mount.mount_point) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    return best


def fs_type(path: str) -> str | None:
    """Filesystem type of the mount containing ``path``; None if it does not exist."""
    if not os.path.isdir(path):
        return None
    try:
        mount = mount_of(path)
    except OSError:
        return None
    return mount.fstype if mount else None


def disk_problem(path: str) -> str | None:
    """Why ``path`` is not a directory on a real disk filesystem, or None if it is."""
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    mount = mount_of(path)
    if mount is None:
        return f"no mount found for {path}"
    if mount.fstype in MEMORY_FS or mount.fstype.startswith("cgroup"):
        return f"{path} is on {mount.fstype} (mounted at {mount.mount_point})"
    if not mount.source.startswith("/dev/"):
        return f"{path} is on {mount.fstype} from {mount.source!r}, not a block device"
    return None


def shm_size(path: str) -> int | None:
    """The size= limit of the tmpfs at ``path`` in bytes; None if missing or unlimited."""
    try:
        size = statvfs_total(path)
    except OSError:
        return None
    return size or None


@dataclass
class Cgroups:
    """How the probe attributes memory to cgroups on this system."""

    version: str  # "v2" | "v1" | "none"
    mode: str  # "per-scenario" | "shared" | "none"
    own_dir: str | None  # the cgroup directory the probe itself is in
    base_dir: str | None  # parent of the per-scenario cgroups (per-scenario mode only)
    problem: str | None = None  # why per-scenario cgroups are not used


def _controller_mount(root: str) -> tuple[str, str] | None:
    """(version, mount directory) of the memory controller below cgroup ``root``."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return "v2", root
    v1_dir = os.path.join(root, "memory")
    if os.path.exists(os.path.join(v1_dir, CGROUP_CURRENT_FILE["v1"])):
        return "v1", v1_dir
    return None


def _own_cgroup_path(version: str, proc_cgroup: str) -> str | None:
    """This process's cgroup path (as in /proc/self/cgroup) in the given hierarchy."""
    for line in proc_cgroup.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if version == "v2" and hier == "0" and controllers == "":
            return path
        if version == "v1" and "memory" in controllers.split(","):
            return path
    return None


def resolve_cgroup_dir(mount_dir: str, mount_root: str, cgroup_path: str) -> str:
    """Directory of ``cgroup_path`` given a hierarchy mounted at ``mount_dir``.

    ``mount_root`` is the hierarchy path that is mounted (mountinfo field 4); inside a
    container without a cgroup namespace it is the container's own cgroup.
    """
    if _is_under(cgroup_path, mount_root):
        rel = os.path.relpath(cgroup_path, mount_root)
        candidate = os.path.normpath(os.path.join(mount_dir, rel))
        if os.path.isdir(candidate):
            return candidate
    return mount_dir


def _own_cgroup_dir(version: str, mount_dir: str) -> str:
    """Directory of the cgroup this process is in."""
    path = _own_cgroup_path(version, read_text("/proc/self/cgroup")) or "/"
    mount = mount_of(mount_dir)
    mount_root = mount.root if mount and mount.mount_point == mount_dir else "/"
    return resolve_cgroup_dir(mount_dir, mount_root, path)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to a /proc, /sys or cgroup file (a sysctl, a cgroup control file)."""
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _make_base(version: str, own_dir: str) -> str:
    """Create ``<own cgroup>/kmatrix`` with the memory controller enabled below it."""
    base = os.path.join(own_dir, CGROUP_BASE_NAME)
    if version == "v2":
        write_text(os.path.join(own_dir, "cgroup.subtree_control"), "+memory")
    os.makedirs(base, exist_ok=True)
    if version == "v2":
        write_text(os.path.join(base, "cgroup.subtree_control"), "+memory")
    return base


def detect_cgroups(root: str) -> Cgroups:
    """Find the memory cgroup hierarchy and try to set up per-scenario cgroups.

    Per-scenario cgroups live in ``<the probe's own cgroup>/kmatrix/<scenario>``; in the
    guest the probe runs in the root cgroup, so that is ``<root>/kmatrix/<scenario>``.
    On failure (read-only cgroupfs in a container, v2 no-internal-process rule) the
    scenario child is measured in the cgroup it shares with the probe.
    """
    found = _controller_mount(root)
    if found is None:
        return Cgroups("none", "none", None, None, f"no memory cgroup under {root}")
    version, mount_dir = found
    own_dir = _own_cgroup_dir(version, mount_dir)
    try:
        base = _make_base(version, own_dir)
    except OSError as exc:
        problem = f"cannot create per-scenario cgroups: {exc}"
        if not _has_memory_files(version, own_dir):
            return Cgroups(
                version, "none", own_dir, None, f"{problem}; no memory files in {own_dir}"
            )
        return Cgroups(version, "shared", own_dir, None, problem)
    return Cgroups(version, "per-scenario", own_dir, base)


def _has_memory_files(version: str, cgroup_dir: str) -> bool:
    """True if the cgroup exposes memory accounting (the v2 root has no memory.current)."""
    names = (CGROUP_CURRENT_FILE[version], "memory.stat")
    return any(os.path.exists(os.path.join(cgroup_dir, name)) for name in names)


def make_scenario_cgroup(cgroups: Cgroups, name: str) -> str:
    """Create (fresh) the scenario's cgroup directory and return it."""
    assert cgroups.base_dir is not None
    path = os.path.join(cgroups.base_dir, name)
    if os.path.isdir(path):
        remove_cgroup(path)
    os.mkdir(path)
    return path


def join_cgroup(path: str) -> None:
    """Move the calling process into cgroup ``path``."""
    write_text(os.path.join(path, "cgroup.procs"), str(os.getpid()))


def remove_cgroup(path: str, timeout: float = 3.0) -> str | None:
    """rmdir a cgroup, retrying while it is still busy; returns an error text or None."""
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


def pids_in_group(pgid: int) -> list[int]:
    """Processes (zombies included) whose process group is ``pgid``, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = read_text(f"/proc/{entry}/stat")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def uptime() -> float | None:
    """Seconds since boot (/proc/uptime), to time the boot and each repeat."""
    try:
        return float(read_text("/proc/uptime").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def kernel_cmdline() -> str | None:
    """The kernel's command line (/proc/cmdline), or None when it cannot be read."""
    try:
        return read_text("/proc/cmdline").strip()
    except OSError:
        return None
