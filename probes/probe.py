#!/usr/bin/env python3
"""kmatrix probe: measure how memfd / O_TMPFILE / shm pages are accounted.

Stdlib-only; runs in the QEMU guest (``python3 -S /probe/probe.py``: no site), in a container and on
a host. The command line, the ``hello`` and ``done`` records, and the order of things:
one ``scenario`` record per scenario as soon as it finishes (scenario_child.py), in
whole passes (``--repeats``), then ``oom`` records for the OOM experiments (``--oom``,
see oom.py). Every record is a ``KMX1`` line of wire.py. See probes/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# The directory is copied into the guest and run as a script: make siblings importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accounting
import catalog
import knobs
import oom
import oom_run
import resume
import swap
import system
from scenario_child import run_scenario
from scenario_types import MIB, Settings
from scenarios import SCENARIOS
from wire import Output

PROBE_VERSION = 1
#: How long --oom-from waits for its plan; the host saves the guest within seconds.
PLAN_TIMEOUT_S = 300.0
PR_SET_CHILD_SUBREAPER = 36


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="record file (default: stdout)")
    p.add_argument("--size-mib", type=int, default=64, help="scenario size (default 64)")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--disk-dir", default="/mnt/disk")
    p.add_argument("--scenarios", default="all", help="comma-separated names, or all")
    p.add_argument("--cgroup-root", default=system.CGROUP_ROOT)
    p.add_argument(
        "--swap-dev", default="", help="a swap device the swap scenarios may swap on (default none)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="per-scenario timeout (s)")
    p.add_argument("--repeats", type=int, default=1, help="passes over the scenarios (default 1)")
    p.add_argument(
        "--oom",
        default="",
        help="OOM experiments: all, or name[:first-last],... (repeat indexes); default none",
    )
    p.add_argument(
        "--oom-from",
        default=None,
        help="a device to read the --oom plan from, once the probe is ready (resume.py: the "
        "host saves the guest while it waits); replaces --oom",
    )
    p.add_argument("--oom-repeats", type=int, default=3, help="repeats per experiment (3)")
    p.add_argument(
        "--oom-timeout", type=float, default=30.0, help="seconds per OOM repeat (default 30)"
    )
    p.add_argument(
        "--oom-memcg",
        choices=("new", "container"),
        default="new",
        help="memcg experiments in a fresh child cgroup (new, default) or in the probe's own "
        "cgroup, e.g. a container's, whose limit is then the experiment's (container)",
    )
    p.add_argument(
        "--host-kernel",
        action="store_true",
        help="the kernel is the host's own (a container): leave its boot command line out",
    )
    p.add_argument(
        "--list", action="store_true", help="list scenario and OOM experiment names and exit"
    )
    return p.parse_args(argv)


def select_scenarios(spec: str) -> list[str]:
    """Scenario names from ``--scenarios``, in canonical order; SystemExit(2) if unknown.

    OOM experiment names are accepted too (and picked out by :func:`select_oom`), so a
    caller can pass one list of everything it wants; ``all`` means the accounting ones.
    """
    if spec.strip() == "all":
        return list(SCENARIOS)
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SCENARIOS and name not in oom.EXPERIMENTS]
    if unknown or not wanted:
        sys.stderr.write(
            f"probe: unknown scenario(s): {', '.join(unknown) or '(none given)'}\n"
            f"valid names: {', '.join([*SCENARIOS, *oom.EXPERIMENTS])}\n"
        )
        raise SystemExit(2)
    return [name for name in SCENARIOS if name in wanted]


def select_oom(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(experiment, repeat) units from ``--oom`` plus OOM names given in ``--scenarios``."""
    spec = ",".join(
        part
        for part in (args.oom, *(n.strip() for n in args.scenarios.split(",")))
        if part and (part == args.oom or part in oom.EXPERIMENTS)
    )
    try:
        return oom.parse_plan(spec, args.oom_repeats) if spec else []
    except ValueError as exc:
        sys.stderr.write(f"probe: --oom: {exc}\n")
        raise SystemExit(2) from None


def become_subreaper() -> bool:
    """Adopt orphaned grandchildren so they can be reaped (best effort, via prctl)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (ImportError, OSError, AttributeError):
        return False


def make_settings(args: argparse.Namespace, subreaper: bool = False) -> Settings:
    """Probe-wide settings from the command line and the system."""
    return Settings(
        size=args.size_mib * MIB,
        page_size=os.sysconf("SC_PAGE_SIZE"),
        shm_dir=args.shm_dir,
        disk_dir=args.disk_dir,
        shm_size=system.shm_size(args.shm_dir),
        disk_problem=system.disk_problem(args.disk_dir),
        swap_dev=args.swap_dev or None,
        subreaper=subreaper,
    )


def hello_record(
    settings: Settings,
    cgroups: system.Cgroups,
    host_kernel: bool = False,
    cgroup_root: str = system.CGROUP_ROOT,
) -> dict[str, Any]:
    """The first record: what kind of system this is. On the host's own kernel (a docker
    cell) without ``cmdline``: that boot line is the host's (its init's arguments too), which
    kmatrix set none of and a report has no business publishing."""
    hello: dict[str, Any] = {
        "type": "hello",
        "probe_version": PROBE_VERSION,
        "release": os.uname().release,
        "machine": os.uname().machine,  # x86_64, aarch64: the architecture that really ran
        "page_size": settings.page_size,
        "mem_total": accounting.mem_total(),
        "cgroup": cgroups.version,
        "cgroup_mode": cgroups.mode,
        "shm_size": settings.shm_size,
        "disk_fs": system.fs_type(settings.disk_dir),
        "python": ".".join(map(str, sys.version_info[:3])),  # platform: 27 ms under TCG
        # every setting that can change an answer, as it is
        "knobs": knobs.read_knobs(cgroup_root),
    }
    if not host_kernel:
        hello["cmdline"] = system.kernel_cmdline()  # what the guest booted with (kpti=0 ...)
    return hello


def _cgroup_version(root: str) -> str:
    """v2 / v1 / none, without changing anything (unlike system.detect_cgroups)."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return "v2"
    return "v1" if os.path.isdir(os.path.join(root, "memory")) else "none"


def run_passes(
    names: list[str],
    args: argparse.Namespace,
    settings: Settings,
    cgroups: system.Cgroups,
    out: Output,
) -> int:
    """``--repeats`` passes over the scenarios, a record each; returns how many."""
    emitted = 0
    sysctls = knobs.snapshot(knobs.SCENARIO_SYSCTLS)
    # Whole passes rather than each scenario N times in a row: slow drift in the system
    # (page cache, per-cpu lists) then spreads over every scenario's repeats alike.
    for repeat in range(max(1, args.repeats)):
        for name in names:
            if repeat and name in catalog.FIRST_PASS_ONLY:
                continue
            record = run_scenario(SCENARIOS[name], settings, cgroups, args.timeout, out.fd)
            # A swap scenario swapped the swap disk on: off again before the next pass, so
            # no other scenario (strict overcommit's CommitLimit counts swap) runs with it.
            problem = swap.swapoff(settings.swap_dev)
            if problem:
                record.setdefault("detail", {})["swapoff_error"] = problem
            # A scenario child killed at its timeout never ran its own clean-up.
            if restored := knobs.restore(sysctls):
                record.setdefault("detail", {})["sysctl_restored_by_probe"] = restored
            out.emit(record | {"repeat": repeat})
            emitted += 1
    return emitted


def oom_env(args: argparse.Namespace, settings: Settings, mem_total: int, out_fd: int) -> oom.Env:
    """The OOM experiments' settings from the command line and the hello record."""
    return oom.Env(
        mem_total=mem_total,
        page_size=settings.page_size,
        shm_dir=args.shm_dir,
        cgroup_root=args.cgroup_root,
        timeout=args.oom_timeout,
        out_fd=out_fd,
        memcg=args.oom_memcg,
        swap_dev=args.swap_dev or None,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios and stream their records."""
    args = parse_args(argv)
    if args.list:
        print("\n".join([*SCENARIOS, *oom.EXPERIMENTS]))
        return 0
    names = select_scenarios(args.scenarios) if args.scenarios else []
    if args.oom_from is not None:  # even "" (init found no plan disk): an error, not no plan
        args.oom = resume.await_plan(args.oom_from, PLAN_TIMEOUT_S)
    plan = select_oom(args)
    out = Output(args.out)
    subreaper = become_subreaper()
    settings = make_settings(args, subreaper)
    # detect_cgroups enables +memory on the v2 root; an OOM-only run must not (oom_scope).
    cgroups = (
        system.detect_cgroups(args.cgroup_root)
        if names
        else system.Cgroups(_cgroup_version(args.cgroup_root), "none", None, None)
    )
    if names and cgroups.problem:
        sys.stderr.write(f"probe: cgroups: {cgroups.problem}\n")
    hello = hello_record(settings, cgroups, args.host_kernel, args.cgroup_root)
    hello["uptime"] = system.uptime()
    out.emit(hello)
    emitted = run_passes(names, args, settings, cgroups, out)
    if cgroups.base_dir:
        system.remove_cgroup(cgroups.base_dir)
    done: dict[str, Any] = {"type": "done", "scenarios": emitted}
    if plan:
        env = oom_env(args, settings, hello["mem_total"] or 0, out.fd)
        done["oom"] = oom_run.run_plan(plan, env, out.emit)
    out.emit(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
