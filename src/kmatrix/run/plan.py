"""Each cell's plan, built once from the matrix and its kernel entry, and the result-cache key.

The plan (kmatrix.cells.plan) is everything the cell runs with; the cache key of a QEMU cell
is that plan plus the digests of what it boots and of the code that reads its output, so a
change to any of them measures the cell again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kmatrix.backends import qemu
from kmatrix.cells.docker import DEFAULT_PIDS_LIMIT, DEFAULT_SHM_SIZE, require_engine
from kmatrix.cells.plan import DockerPlan, OomPlan, ProbePlan, QemuPlan, plan_units
from kmatrix.config import DockerKernel, Matrix, QemuKernel
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.userland import INIT_FILE, Userland
from kmatrix.results.cache import cell_key


def probe_plan(matrix: Matrix) -> ProbePlan:
    """The probe's accounting run, as ``probe:`` says."""
    scenarios = matrix.probe.scenarios
    return ProbePlan(
        size_bytes=matrix.probe.size,
        scenarios=scenarios if isinstance(scenarios, str) else tuple(scenarios),
        repeats=matrix.probe.repeats,
    )


def oom_plan(matrix: Matrix) -> OomPlan:
    """The OOM experiments, as ``oom:`` says."""
    cfg = matrix.oom
    return OomPlan(
        units=plan_units(cfg.experiments, cfg.repeats),
        repeats=cfg.repeats,
        timeout_s=cfg.timeout,
        memory_bytes=cfg.memory,
        snapshot=cfg.snapshot,
    )


def qemu_plan(matrix: Matrix, kernel: QemuKernel, accel: str) -> QemuPlan:
    """A QEMU cell's plan under ``accel`` (the kernel's own sizes win over guest:)."""
    return QemuPlan(
        name=kernel.name,
        arch=kernel.arch,
        accel=accel,
        memory_bytes=kernel.memory or matrix.guest.memory,
        shm_size=kernel.shm_size or matrix.guest.shm_size,
        cell_timeout_s=matrix.probe.cell_timeout,
        probe=probe_plan(matrix),
        oom=oom_plan(matrix),
        cpu=qemu.arch_for(kernel.arch).tcg_cpu if accel == "tcg" else "host",
        cpus=matrix.guest.cpus,
        tcg_thread=matrix.guest.tcg_thread if accel == "tcg" else None,
        disk_bytes=matrix.guest.disk_size,
        swap_bytes=matrix.guest.swap,
        cmdline=kernel.cmdline,
    )


def docker_plan(matrix: Matrix, kernel: DockerKernel) -> DockerPlan:
    """A docker cell's plan: the container's limits from its entry."""
    return DockerPlan(
        name=kernel.name,
        arch=kernel.arch,
        accel="container",
        memory_bytes=kernel.memory,
        shm_size=kernel.shm_size or DEFAULT_SHM_SIZE,
        cell_timeout_s=matrix.probe.cell_timeout,
        probe=probe_plan(matrix),
        oom=oom_plan(matrix),
        pids_limit=kernel.pids_limit or DEFAULT_PIDS_LIMIT,
        require_engine=require_engine(matrix.require_docker),
    )


#: Host-side code that shapes a QEMU cell: how it boots (command line, devices, modules,
#: the initrd, the PVH image) and how its results are built from what the guest printed, by
#: path under the kmatrix package.
PARSERS = (
    "results/oomlog.py",
    "results/oom.py",
    "results/repeats.py",
    "cells/console.py",
    "results/schema.py",
    "cells/qemu.py",
    "cells/oom_boots.py",
    "cells/oom_guest.py",
    "cells/oom_saved.py",
    "backends/qemu.py",
    "backends/qmp.py",
    "guest/bootimage.py",
    "guest/kmods.py",
    "guest/userland.py",
)


def parsers_digest() -> str:
    """One digest of the host code in :data:`PARSERS`: a parser change re-measures."""
    h = hashlib.sha256()
    for name in PARSERS:
        h.update((Path(__file__).parents[1] / name).read_bytes())
    return h.hexdigest()


def qemu_version_of(host: Mapping[str, Any], arch: str) -> str | None:
    """The recorded version of the QEMU binary that boots ``arch`` guests."""
    return host.get("qemu") if arch == "amd64" else host.get(f"qemu_{arch}")


def cache_key(
    plan: QemuPlan,
    prepared: PreparedKernel,
    userland: Userland,
    probe_sha256: str,
    qemu_version: str | None,
) -> str:
    """The result-cache key of a QEMU cell.

    The plan holds the cell's name (its id in the results: two cells of one kernel are two
    entries) and everything it is measured with; what the matrix says about checks or where
    packages come from is not in it. The kernel is its package's SHA256, or for a local build
    ``build_sha256`` (bzImage, modules tree and .config).
    """
    provenance = prepared.provenance
    return cell_key(
        {
            "plan": plan.as_json(),
            "kernel": provenance.get("build_sha256") or provenance.get("sha256"),
            "userland": userland.key,
            "probe": probe_sha256,
            "init": hashlib.sha256(INIT_FILE.read_bytes()).hexdigest(),
            "parsers": parsers_digest(),
            "qemu": qemu_version,
        }
    )
