"""Metric readers for the kmatrix probe: parse /proc and cgroup files into bytes.

Everything here is stdlib-only and side-effect free apart from reading files. A reader
returns only the metrics it could actually read; a missing file or field is left out,
never replaced by a guessed number. Metric names: docs/architecture.md, "Metrics".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

KIB = 1024

#: /proc/PID/status fields (kB) -> metric name.
STATUS_FIELDS: tuple[str, ...] = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSwap")

#: /proc/meminfo fields (kB); the metric name is ``meminfo_<field>``.
MEMINFO_FIELDS: tuple[str, ...] = (
    "Shmem", "Cached", "MemAvailable", "Committed_AS", "SwapCached",
)  # fmt: skip

#: memory.stat key -> metric name, per cgroup version.
CGROUP_STAT_KEYS: dict[str, dict[str, str]] = {
    "v2": {"anon": "cgroup_anon", "file": "cgroup_file", "shmem": "cgroup_shmem"},
    "v1": {"rss": "cgroup_anon", "cache": "cgroup_file", "shmem": "cgroup_shmem"},
}

#: File holding the cgroup's total charge, per cgroup version.
CGROUP_CURRENT_FILE: dict[str, str] = {"v2": "memory.current", "v1": "memory.usage_in_bytes"}


@dataclass(frozen=True)
class Target:
    """What to measure: a process, optionally its cgroup and a path on the backing fs."""

    pid: int
    cgroup_dir: str | None = None
    cgroup_version: str = "none"
    fs_path: str | None = None


def read_text(path: str) -> str:
    """Return the whole text of a (small) file."""
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


class ProcFile:
    """A /proc file opened once and read again from its start with pread.

    Opening it again would look its path up; a dentry or inode evicted under memory
    pressure is then allocated anew (GFP_KERNEL|__GFP_RECLAIMABLE), and that allocation can
    invoke the OOM killer itself, with the reader as its trigger. Seen in the OOM harness,
    which reads /proc per chunk while memory runs out.
    """

    #: More than /proc/PID/status or /proc/meminfo ever hold; one read returns it all.
    SIZE = 8192

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        # Read into one buffer of our own, and once now: a seq_file allocates its kernel
        # page buffer at the first read, which should not be the one under pressure.
        self._buf = bytearray(self.SIZE)
        with contextlib.suppress(OSError):  # gone already: read() says so again later
            self.read()

    def read(self) -> str:
        """The file's text as of now (OSError once the process behind it is gone)."""
        n = os.preadv(self.fd, [self._buf], 0)
        return self._buf[:n].decode("ascii", errors="replace")

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_int(path: str) -> int | None:
    """The integer a /proc, /sys or cgroup file starts with (a sysctl, memory.current), or
    None if the file does not exist or holds no integer."""
    try:
        return int(read_text(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def parse_kb_fields(text: str) -> dict[str, int]:
    """Parse ``Key:   123 kB`` lines (status, meminfo, smaps_rollup) into bytes.

    Lines with a bare number are kept as-is (e.g. ``HugePages_Total: 0``); lines that do
    not look like ``Key: number`` (the smaps_rollup header, ``Name:`` ...) are skipped.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        number = int(parts[0])
        if len(parts) > 1 and parts[1] == "kB":
            number *= KIB
        values[key.strip()] = number
    return values


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (cgroup memory.stat) into a dict of ints."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def status_metrics(text: str) -> dict[str, int]:
    """Pick the RSS metrics out of /proc/PID/status text."""
    fields = parse_kb_fields(text)
    return {name: fields[name] for name in STATUS_FIELDS if name in fields}


def meminfo_metrics(text: str) -> dict[str, int]:
    """Pick the ``meminfo_*`` metrics out of /proc/meminfo text."""
    fields = parse_kb_fields(text)
    found = {f"meminfo_{name}": fields[name] for name in MEMINFO_FIELDS if name in fields}
    if "SwapTotal" in fields and "SwapFree" in fields:
        found["meminfo_SwapUsed"] = fields["SwapTotal"] - fields["SwapFree"]
    return found


def smaps_rollup_metrics(text: str) -> dict[str, int]:
    """Pick Pss and Swap out of /proc/PID/smaps_rollup text (Swap there includes a shmem
    mapping's swapped pages, which VmSwap -- MM_SWAPENTS -- does not)."""
    fields = parse_kb_fields(text)
    found = {"Pss": fields["Pss"]} if "Pss" in fields else {}
    if "Swap" in fields:
        found["smaps_Swap"] = fields["Swap"]
    return found


def cgroup_stat_metrics(text: str, version: str) -> dict[str, int]:
    """Map memory.stat text to cgroup_anon/file/shmem for cgroup ``version``."""
    fields = parse_flat_keyed(text)
    keys = CGROUP_STAT_KEYS.get(version, {})
    return {metric: fields[key] for key, metric in keys.items() if key in fields}


def _try(read: Callable[[], dict[str, int]]) -> dict[str, int]:
    """Call ``read()``; an unreadable file yields no metrics instead of an error."""
    try:
        return read()
    except (OSError, ValueError):
        return {}


def read_process(pid: int) -> dict[str, int]:
    """VmRSS/RssAnon/RssFile/RssShmem, Pss and oom_score of process ``pid``."""
    metrics = _try(lambda: status_metrics(read_text(f"/proc/{pid}/status")))
    metrics.update(_try(lambda: smaps_rollup_metrics(read_text(f"/proc/{pid}/smaps_rollup"))))
    metrics.update(_try(lambda: {"oom_score": int(read_text(f"/proc/{pid}/oom_score"))}))
    return metrics


def meminfo_fields() -> dict[str, int]:
    """Every field of /proc/meminfo, in bytes; OSError if it cannot be read."""
    return parse_kb_fields(read_text("/proc/meminfo"))


def mem_total() -> int | None:
    """MemTotal in bytes (None if /proc/meminfo has no such field)."""
    return meminfo_fields().get("MemTotal")


def read_meminfo() -> dict[str, int]:
    """System-wide ``meminfo_*`` metrics."""
    return _try(lambda: meminfo_metrics(read_text("/proc/meminfo")))


def read_cgroup(cgroup_dir: str, version: str) -> dict[str, int]:
    """cgroup_current and cgroup_anon/file/shmem of one cgroup directory."""
    metrics: dict[str, int] = {}
    current = CGROUP_CURRENT_FILE.get(version)
    if current:
        path = os.path.join(cgroup_dir, current)
        metrics.update(_try(lambda: {"cgroup_current": int(read_text(path))}))
    stat = os.path.join(cgroup_dir, "memory.stat")
    metrics.update(_try(lambda: cgroup_stat_metrics(read_text(stat), version)))
    return metrics


def statvfs_used(path: str) -> int:
    """Used bytes of the filesystem holding ``path``: (f_blocks - f_bfree) * f_frsize."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def statvfs_total(path: str) -> int:
    """Size in bytes of the filesystem holding ``path`` (0 = no size limit on tmpfs)."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def read_fs(path: str) -> dict[str, int]:
    """fs_used of the filesystem holding ``path`` (a directory or /proc/PID/fd/N)."""
    return _try(lambda: {"fs_used": statvfs_used(path)})


def measure(target: Target) -> dict[str, int]:
    """All metrics readable for ``target`` right now."""
    metrics = read_process(target.pid)
    metrics.update(read_meminfo())
    if target.cgroup_dir:
        metrics.update(read_cgroup(target.cgroup_dir, target.cgroup_version))
    if target.fs_path:
        metrics.update(read_fs(target.fs_path))
    return metrics


def deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """``<metric>_delta = after - before`` for every metric present in both."""
    return {f"{k}_delta": after[k] - before[k] for k in before if k in after}
