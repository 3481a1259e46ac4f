"""The OOM boots of a QEMU cell: run every (experiment, repeat) unit in as few boots as can be.

One boot runs the units in the probe's order (oom-memcg-v1 first, oom-no-killable last);
the repeats that end their boot in a panic after the first get boots of their own, run
alongside it (plan_lanes). A boot that ends early — the expected panic of oom-no-killable,
or an unexpected panic or hang — costs only the unit that was running (the probe announced
it with a ``start`` record): that unit is recorded from the console and the next boot runs
what is left. The OOM boots use their own guest memory (``oom.memory``), not the accounting
boot's.
"""

from __future__ import annotations

import itertools
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from kmatrix.backends.qemu import (
    QemuRun,
    QemuSpec,
    arch_for,
    build_argv,
    make_swap_image,
    run_qemu,
)
from kmatrix.backends.qemu import read_log as _read
from kmatrix.catalog import ENDS_BOOT, NEEDS_SWAP
from kmatrix.cells.console import analyze_console
from kmatrix.cells.plan import OomPlan, QemuPlan
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.kmods import Module, modules_to_load
from kmatrix.guest.userland import Userland, cell_archive, write_initrd
from kmatrix.results.contract import Hello
from kmatrix.results.contract_oom import OomBoot, OomExperiment
from kmatrix.results.oom import BootEnd, BootOutput, Unit, assemble
from kmatrix.results.schema import parse_probe_output

#: /dev/shm size= in the OOM boots, as a fraction of guest memory: large enough for the
#: tmpfile-shm and shm-named holders (40 % of MemTotal), so ENOSPC never ends them early.
SHM_FRACTION = 0.9
#: Boot, userland unpack and probe start-up under TCG.
BOOT_ALLOWANCE_S = 90
#: A repeat takes 1-3 s under TCG; allow 8 s each on a loaded host.
UNIT_S = 8
#: The probe ends a hung repeat itself (oom.timeout); allow for a few of those. Only a
#: guest that hangs as a whole runs into the boot timeout, and then costs one repeat.
HUNG_REPEATS_ALLOWED = 3
#: Worst case per repeat beyond the in-guest timeout, for callers that budget the OOM part
#: as a whole (every repeat hung): BOOT_ALLOWANCE_S + repeats * (oom.timeout + UNIT_SLACK_S).
UNIT_SLACK_S = 10
#: "quiet" keeps the boot off the slow serial console; init raises the loglevel again.
OOM_APPEND = "quiet"


@dataclass
class OomRun:
    """Everything the OOM boots of one cell produced."""

    experiments: list[OomExperiment]
    boots: list[OomBoot] = field(default_factory=list)
    consoles: list[str] = field(default_factory=list)


def plan_arg(units: list[Unit]) -> str:
    """The probe's ``--oom`` argument: ``name:first-last`` per run of consecutive repeats."""
    parts: list[str] = []
    for name in dict.fromkeys(u.name for u in units):
        reps = sorted(u.repeat for u in units if u.name == name)
        start = prev = reps[0]
        for r in [*reps[1:], None]:
            if r is not None and r == prev + 1:
                prev = r
                continue
            parts.append(f"{name}:{start}-{prev}")
            if r is not None:
                start = prev = r
    return ",".join(parts)


#: A guest that panics before the probe starts has measured nothing: it is booted again,
#: this many times at most. Seen once in six boots of Debian's 7.3-rc under TCG with 2
#: vCPUs: an early-boot Oops (int3 in sched_clock_cpu, "Fatal exception in interrupt").
EARLY_CRASH_RETRIES = 2


def crashed_early(hello: Hello | None, panic: object) -> bool:
    """The boot panicked before the probe said hello (so nothing was measured)."""
    return hello is None and bool(panic)


def _boot_timeout(oom: OomPlan, units: list[Unit]) -> float:
    return BOOT_ALLOWANCE_S + len(units) * UNIT_S + HUNG_REPEATS_ALLOWED * oom.timeout_s


def _boot(
    kernel: PreparedKernel, userland: Userland, plan: QemuPlan, workdir: Path,
    units: list[Unit], index: int, image: Path, cancelled: Callable[[], bool],
) -> BootOutput:  # fmt: skip
    """One OOM boot running ``units``; returns what came back (never raises on a panic)."""
    cfg = plan.oom
    arch = arch_for(plan.arch)
    args = {
        "KMX_MODE": "oom",
        "KMX_RESULT_DEV": arch.result_device,
        "KMX_OOM": plan_arg(units),
        "KMX_OOM_REPEATS": str(cfg.repeats),
        "KMX_OOM_TIMEOUT": str(cfg.timeout_s),
        "KMX_SHM_SIZE": str(int(cfg.memory_bytes * SHM_FRACTION)),
        "KMX_SIZE_MIB": "0",
        "KMX_SCENARIOS": "",
    }
    initrd = workdir / f"oom-{index}.initrd"
    swap = (
        swap_image(workdir, min(plan.swap_bytes, int(cfg.memory_bytes * OOM_SWAP_FRACTION)),
                   name=f"oom-{index}.swap.img")
        if any(u.name in NEEDS_SWAP for u in units)
        else None
    )  # fmt: skip
    args["KMX_SWAP"] = "1" if swap is not None else "0"
    write_initrd(userland, cell_archive(args, _boot_modules(kernel, swap is not None)), initrd)
    spec = QemuSpec(
        vmlinuz=image,
        initrd=initrd,
        console_log=workdir / f"oom-{index}.console.log",
        result_log=workdir / f"oom-{index}.results.log",
        memory_bytes=cfg.memory_bytes,
        accel=plan.accel,
        swap=swap,
        cpus=plan.cpus,
        append=f"{OOM_APPEND} {plan.cmdline}".strip(),
        arch=arch,
    )
    # Weighed by its repeats: the main boot gets a slot before the panicking repeats' boots.
    try:
        run = run_qemu(
            build_argv(spec), _boot_timeout(cfg, units), weight=len(units), cancelled=cancelled
        )
    finally:
        initrd.unlink(missing_ok=True)
        if swap is not None:
            swap.unlink(missing_ok=True)
    console = _read(spec.console_log)
    probe = parse_probe_output(_read(spec.result_log).splitlines())
    return BootOutput(index, units, probe, console, _boot_end(run, console))


#: The OOM boots' swap disk, as a fraction of oom.memory: room for the swapped holder (half
#: of MemAvailable) and little more, so the hog that fills RAM and swap is done quickly.
OOM_SWAP_FRACTION = 1 / 3


def swap_image(workdir: Path, size: int, name: str = "swap.img") -> Path | None:
    """A fresh swap disk of ``size`` bytes for one boot, or None when ``size`` is 0."""
    if not size:
        return None
    path = workdir / name
    make_swap_image(path, size)
    return path


#: What the swap disk needs where the kernel builds it as modules (Debian cloud kernels).
SWAP_MODULES = ("virtio_pci", "virtio_blk")


def _boot_modules(kernel: PreparedKernel, swap: bool) -> list[Module]:
    """The result channel's modules, where the kernel builds them as modules (arm64 6.1),
    and the swap disk's when there is one."""
    wanted = arch_for(kernel.arch).channel_modules + (SWAP_MODULES if swap else ())
    return modules_to_load(kernel.modules_dir, wanted) if wanted and kernel.modules_dir else []


def _boot_end(run: QemuRun, console: str) -> BootEnd:
    summary = analyze_console(console)
    return {
        "duration_s": run.duration_s,
        "timed_out": run.timed_out,
        "returncode": run.returncode,
        "panic": summary.panic,
        "console_tail": summary.tail[-25:],
    }


def plan_lanes(units: list[Unit]) -> list[list[Unit]]:
    """The units split into boots that can run side by side (each lane a boot, at first).

    The first lane runs everything up to and including the first repeat that ends its boot
    (catalog.ENDS_BOOT, which the probe runs last); every further such repeat gets a lane of
    its own, so a cell's panics cost one boot each in parallel instead of in a row.
    """
    ending = [u for u in units if u.name in ENDS_BOOT]
    first = [u for u in units if u.name not in ENDS_BOOT] + ending[:1]
    return [lane for lane in (first, *([u] for u in ending[1:])) if lane]


def run_oom_boots(
    kernel: PreparedKernel,
    userland: Userland,
    plan: QemuPlan,
    workdir: Path,
    keep_workdir: bool = False,
    image: Path | None = None,
    cancel: threading.Event | None = None,
) -> OomRun:
    """Run every OOM unit of the plan on ``kernel``: its lanes side by side, each one boot
    plus one per early end. QEMU's slots (backends.qemu) bound how many run at once.

    ``keep_workdir`` keeps each boot's raw console and result logs (for fixtures); ``image``
    is what QEMU boots (kmatrix.guest.bootimage), the kernel's vmlinuz by default; once
    ``cancel`` is set (the cell failed elsewhere) no lane starts another boot.
    """
    units = list(plan.oom.units)
    if not units:
        return OomRun([])
    workdir.mkdir(parents=True, exist_ok=True)
    lanes = plan_lanes(units)
    counter = itertools.count(1)
    stop = cancel or threading.Event()

    def run_lane(lane: list[Unit]) -> list[BootOutput]:
        return _run_lane(lane, lambda rest: _boot(
            kernel, userland, plan, workdir, rest, next(counter),
            image or kernel.vmlinuz, stop.is_set), stop.is_set)  # fmt: skip

    with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="oom-lane") as pool:
        per_lane = list(pool.map(run_lane, lanes))
    # Numbered in lane order, whatever order the lanes finished in.
    boots = [replace(b, index=i) for i, b in enumerate(itertools.chain(*per_lane), 1)]
    result = OomRun(assemble(units, boots))
    for boot in boots:
        result.boots.append(boot.summary())
        result.consoles.append(boot.console)
    if not keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _run_lane(
    units: list[Unit],
    boot_units: Callable[[list[Unit]], BootOutput],
    cancelled: Callable[[], bool] = lambda: False,
) -> list[BootOutput]:
    """Boot ``units``, and again for what is left after each boot that ended early."""
    boots: list[BootOutput] = []
    remaining = units
    retries = EARLY_CRASH_RETRIES
    while remaining and not cancelled():
        boot = boot_units(remaining)
        boots.append(boot)
        covered = boot.covered() & set(remaining)
        if not covered:
            if crashed_early(boot.probe.hello, boot.end.get("panic")) and retries:
                retries -= 1  # measured nothing: boot again
                continue
            break  # no unit even started: another boot would fail the same way
        remaining = [u for u in remaining if u not in covered]
    return boots
