"""What one cell runs, decided before it starts: a frozen plan per cell.

kmatrix.run builds the plan once per cell from the matrix and the kernel entry
(kmatrix.run.plan); the cells (cells/qemu.py, cells/oom_boots.py, cells/docker.py) read
nothing else of the matrix. The plan of a QEMU cell is also what its result-cache key is
made of, with the digests of the kernel, userland, probe and parsers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from kmatrix import catalog
from kmatrix.results.contract import TcgThread
from kmatrix.results.oom import EXPERIMENTS, Unit


@dataclass(frozen=True)
class ProbePlan:
    """The accounting run of the probe: ``probe:`` of matrix.yaml."""

    size_bytes: int  # each scenario's size (whole MiB)
    scenarios: tuple[str, ...] | Literal["all"]
    repeats: int  # passes over the scenarios in one boot or container

    @property
    def runs(self) -> int:
        """How many scenario runs the passes make (catalog.FIRST_PASS_ONLY ones run once)."""
        names = catalog.SCENARIOS if self.scenarios == "all" else self.scenarios
        return sum(1 if n in catalog.FIRST_PASS_ONLY else self.repeats for n in names)


@dataclass(frozen=True)
class OomPlan:
    """The OOM experiments: every (experiment, repeat) unit and what they run with."""

    units: tuple[Unit, ...]  # in canonical order; empty: no OOM boots
    repeats: int
    timeout_s: int  # per repeat, inside the guest or container
    memory_bytes: int  # guest RAM of the OOM boots (QEMU cells)
    snapshot: bool = True  # boot once, save, restore every OOM boot from it (QEMU cells)


@dataclass(frozen=True)
class CellPlan:
    """What every cell needs, whichever backend runs it."""

    name: str  # the cell's id
    arch: str  # Debian architecture
    accel: str  # tcg | kvm | container
    memory_bytes: int  # guest RAM of the accounting boot, or the container's limit
    shm_size: int  # /dev/shm size (bytes)
    cell_timeout_s: int
    probe: ProbePlan
    oom: OomPlan

    def as_json(self) -> dict[str, Any]:
        """The plan as plain data (for the result-cache key)."""
        return asdict(self)


@dataclass(frozen=True)
class QemuPlan(CellPlan):
    """A QEMU cell: the guest's shape besides its memory."""

    cpu: str  # QEMU's -cpu: the architecture's TCG model, or host under KVM
    cpus: int  # vCPUs
    # How TCG runs them (why single: backends/qemu.py, TcgThread); None under KVM, which
    # gives each vCPU a thread of its own (so the setting changes no KVM cell's cache key).
    tcg_thread: TcgThread | None
    disk_bytes: int  # the ext4 disk of the disk-backed scenarios
    swap_bytes: int  # the swap disk (0: none)
    cmdline: str  # extra kernel command line


@dataclass(frozen=True)
class DockerPlan(CellPlan):
    """A docker cell: the container's limits besides its memory."""

    pids_limit: int
    require_engine: bool  # a missing engine is an error, not a skipped cell


def plan_units(experiments: Sequence[str] | Literal["all"], repeats: int) -> tuple[Unit, ...]:
    """Every (experiment, repeat) unit asked for, in canonical order (the names were
    checked when matrix.yaml loaded: OomConfig)."""
    names = list(EXPERIMENTS) if experiments == "all" else list(experiments)
    return tuple(Unit(n, r) for n in EXPERIMENTS if n in names for r in range(repeats))
