#!/usr/bin/env python3
"""kmatrix probe: measure how memfd / O_TMPFILE / shm pages are accounted.

Stdlib-only; runs in the QEMU guest (``python3 /probe/probe.py``), in a container and on
a host. Writes one ``KMX1 <compact json>`` line per record: ``hello``, one ``scenario``
record per scenario as soon as it finishes, and ``done``. See probes/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import termios
import zlib
from typing import Any

# The directory is copied into the guest and run as a script: make siblings importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accounting
import system
from protocol import run_scenario, write_all
from scenarios import MIB, SCENARIOS, Settings

PROBE_VERSION = 1
RECORD_PREFIX = b"KMX1 "
PR_SET_CHILD_SUBREAPER = 36


class Output:
    """Unbuffered record stream: every record is one line written with one os.write."""

    def __init__(self, path: str | None) -> None:
        if path is None:
            sys.stdout.flush()
            self.fd = sys.stdout.fileno()
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOCTTY
            self.fd = os.open(path, flags, 0o644)
            if os.isatty(self.fd):
                _raw_output(self.fd)

    def emit(self, record: dict[str, Any]) -> None:
        """Write one ``KMX1 <json> <crc32>`` line.

        The CRC lets the host reject a record that kernel messages or a dying serial line
        garbled even where the damage still parses as JSON (e.g. inside a string).
        """
        line = json.dumps(record, separators=(",", ":"), sort_keys=False).encode()
        crc = b"%08x" % zlib.crc32(line)
        write_all(self.fd, RECORD_PREFIX + line + b" " + crc + b"\n")


def _raw_output(fd: int) -> None:
    """Turn off output post-processing (\\n -> \\r\\n) on a serial port used for records."""
    attrs = termios.tcgetattr(fd)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="record file (default: stdout)")
    p.add_argument("--size-mib", type=int, default=64, help="scenario size (default 64)")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/mnt/disk")
    p.add_argument("--scenarios", default="all", help="comma-separated names, or all")
    p.add_argument("--cgroup-root", default="/sys/fs/cgroup")
    p.add_argument("--timeout", type=float, default=120.0, help="per-scenario timeout (s)")
    p.add_argument("--list", action="store_true", help="list scenario names and exit")
    return p.parse_args(argv)


def select_scenarios(spec: str) -> list[str]:
    """Scenario names from ``--scenarios``, in canonical order; SystemExit(2) if unknown."""
    if spec.strip() == "all":
        return list(SCENARIOS)
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SCENARIOS]
    if unknown or not wanted:
        sys.stderr.write(
            f"probe: unknown scenario(s): {', '.join(unknown) or '(none given)'}\n"
            f"valid names: {', '.join(SCENARIOS)}\n"
        )
        raise SystemExit(2)
    return [name for name in SCENARIOS if name in wanted]


def become_subreaper() -> bool:
    """Adopt orphaned grandchildren so they can be reaped (best effort, via prctl)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (ImportError, OSError, AttributeError):
        return False


def make_settings(args: argparse.Namespace) -> Settings:
    """Probe-wide settings from the command line and the system."""
    return Settings(
        size=args.size_mib * MIB,
        page_size=os.sysconf("SC_PAGE_SIZE"),
        shm_dir=args.shm_dir,
        disk_dir=args.disk_dir,
        shm_size=system.shm_size(args.shm_dir),
        disk_problem=system.disk_problem(args.disk_dir),
    )


def hello_record(settings: Settings, cgroups: system.Cgroups) -> dict[str, Any]:
    """The first record: what kind of system this is."""
    return {
        "type": "hello",
        "probe_version": PROBE_VERSION,
        "release": os.uname().release,
        "page_size": settings.page_size,
        "mem_total": accounting.parse_kb_fields(accounting.read_text("/proc/meminfo")).get(
            "MemTotal"
        ),
        "cgroup": cgroups.version,
        "cgroup_mode": cgroups.mode,
        "shm_size": settings.shm_size,
        "disk_fs": system.fs_type(settings.disk_dir),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios and stream their records."""
    args = parse_args(argv)
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    names = select_scenarios(args.scenarios)
    out = Output(args.out)
    settings = make_settings(args)
    cgroups = system.detect_cgroups(args.cgroup_root)
    if cgroups.problem:
        sys.stderr.write(f"probe: cgroups: {cgroups.problem}\n")
    become_subreaper()
    out.emit(hello_record(settings, cgroups))
    for name in names:
        out.emit(run_scenario(SCENARIOS[name], settings, cgroups, args.timeout, out.fd))
    if cgroups.base_dir:
        system.remove_cgroup(cgroups.base_dir)
    out.emit({"type": "done", "scenarios": len(names)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
