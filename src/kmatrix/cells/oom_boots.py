"""The OOM boots of a QEMU cell: run every (experiment, repeat) unit in as few boots as can be.

One boot runs the units in the probe's order (oom-memcg-v1 first, oom-no-killable last);
the repeats that end their boot in a panic after the first get boots of their own, run
alongside it (plan_lanes). A boot that ends early — the expected panic of oom-no-killable,
or an unexpected panic or hang — costs only the unit that was running (the probe announced
it with a ``start`` record): that unit is recorded from the console and the next boot runs
what is left. The OOM boots use their own guest memory (``oom.memory``), not the accounting
boot's.

With ``oom.snapshot`` (the default) the kernel is booted once per cell: that boot is saved
when its probe is ready (backends.qmp, probes/resume.py) and every boot above is a restore
of it, told its units by a plan disk of its own. If the saving boot fails, the lanes boot.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
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
    copy_sparse,
    make_swap_image,
    run_qemu,
    write_plan_disk,
)
from kmatrix.backends.qemu import read_log as _read
from kmatrix.backends.qmp import Saved, save_and_quit
from kmatrix.catalog import ENDS_BOOT, NEEDS_SWAP, probe_module
from kmatrix.cells.console import analyze_console
from kmatrix.cells.plan import OomPlan, QemuPlan
from kmatrix.errors import InfraError
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.kmods import Module, modules_to_load
from kmatrix.guest.userland import Userland, cell_archive, write_initrd
from kmatrix.results.contract import Hello
from kmatrix.results.contract_oom import OomBoot, OomExperiment, OomSnapshot
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
    snapshot: OomSnapshot | None = None  # the saved boot the others were restored from
    snapshot_console: str = ""


@dataclass(frozen=True)
class Snapshot:
    """A cell's OOM boot saved while its probe waited for a plan: what each lane restores."""

    state: Path  # the saved guest (backends.qmp)
    initrd: Path  # a restored QEMU is given the saved one's command line, initrd included
    swap: Path | None  # its swap disk, formatted by its init: each restore gets a copy


_RESUME = probe_module("resume")


def plan_block(units: list[Unit]) -> bytes:
    """A plan disk's content for ``units`` (read by probes/resume.py parse_block)."""
    return bytes(_RESUME.MAGIC) + plan_arg(units).encode("ascii") + b"\n"


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


def _oom_args(plan: QemuPlan, units: list[Unit], swap: bool, saved: bool) -> dict[str, str]:
    """What an OOM boot's /init reads from /kmatrix/args."""
    cfg = plan.oom
    return {
        "KMX_MODE": "oom",
        "KMX_RESULT_DEV": arch_for(plan.arch).result_device,
        "KMX_OOM": plan_arg(units),
        "KMX_OOM_REPEATS": str(cfg.repeats),
        "KMX_OOM_TIMEOUT": str(cfg.timeout_s),
        "KMX_SHM_SIZE": str(int(cfg.memory_bytes * SHM_FRACTION)),
        "KMX_SIZE_MIB": "0",
        "KMX_SCENARIOS": "",
        "KMX_SWAP": "1" if swap else "0",
        "KMX_SNAPSHOT": "1" if saved else "0",
    }


def _oom_spec(plan: QemuPlan, image: Path, initrd: Path, workdir: Path, name: str) -> QemuSpec:
    """An OOM boot's QEMU, logs named after ``name``; the caller adds its disks."""
    return QemuSpec(
        vmlinuz=image,
        initrd=initrd,
        console_log=workdir / f"{name}.console.log",
        result_log=workdir / f"{name}.results.log",
        memory_bytes=plan.oom.memory_bytes,
        accel=plan.accel,
        cpus=plan.cpus,
        append=f"{OOM_APPEND} {plan.cmdline}".strip(),
        arch=arch_for(plan.arch),
    )


def _oom_swap_bytes(plan: QemuPlan, units: list[Unit]) -> int:
    """The swap disk an OOM boot of ``units`` gets (0: none)."""
    if not any(u.name in NEEDS_SWAP for u in units):
        return 0
    return min(plan.swap_bytes, int(plan.oom.memory_bytes * OOM_SWAP_FRACTION))


def _boot(
    kernel: PreparedKernel, userland: Userland, plan: QemuPlan, workdir: Path,
    units: list[Unit], index: int, image: Path, cancelled: Callable[[], bool],
    snapshot: Snapshot | None = None,
) -> BootOutput:  # fmt: skip
    """One OOM boot running ``units``, booted or restored from ``snapshot``; returns what
    came back (never raises on a panic)."""
    name = f"oom-{index}"
    made: list[Path] = []  # this boot's own files, removed after it
    if snapshot is None:
        swap = swap_image(workdir, _oom_swap_bytes(plan, units), name=f"{name}.swap.img")
        initrd = workdir / f"{name}.initrd"
        args = _oom_args(plan, units, swap is not None, saved=False)
        write_initrd(userland, cell_archive(args, _boot_modules(kernel, swap is not None)), initrd)
        made += [initrd, *([swap] if swap else [])]
        spec = replace(_oom_spec(plan, image, initrd, workdir, name), swap=swap)
    else:
        swap = None
        if snapshot.swap is not None:
            swap = workdir / f"{name}.swap.img"
            copy_sparse(snapshot.swap, swap)
            made.append(swap)
        plan_disk = workdir / f"{name}.plan.img"
        write_plan_disk(plan_disk, plan_block(units))
        made.append(plan_disk)
        spec = replace(_oom_spec(plan, image, snapshot.initrd, workdir, name),
                       swap=swap, plan=plan_disk, incoming=snapshot.state)  # fmt: skip
    # Weighed by its repeats: the main boot gets a slot before the panicking repeats' boots.
    try:
        run = run_qemu(
            build_argv(spec), _boot_timeout(plan.oom, units), weight=len(units),
            cancelled=cancelled,
        )  # fmt: skip
    finally:
        for path in made:
            path.unlink(missing_ok=True)
    console = _read(spec.console_log)
    probe = parse_probe_output(_read(spec.result_log).splitlines())
    return BootOutput(index, units, probe, console, _boot_end(run, console), snapshot is not None)


#: Seconds the saving boot may take to reach the probe and be saved (a boot takes 3-8 s).
SAVE_BOOT_TIMEOUT_S = BOOT_ALLOWANCE_S
#: Seconds for writing the saved state (about 0.3 s for a 192M guest).
SAVE_TIMEOUT_S = 60.0


class _Saver:
    """Watches the saving boot's console; once the probe says it waits, saves and quits."""

    def __init__(self, console: Path, qmp: Path, state: Path) -> None:
        self.console, self.qmp, self.state = console, qmp, state
        self.saved: Saved | None = None
        self.error: str | None = None

    def poll(self) -> None:
        """Called by run_qemu while QEMU runs."""
        if self.saved or self.error or _RESUME.MARK not in _read(self.console):
            return
        try:
            self.saved = save_and_quit(self.qmp, self.state, SAVE_TIMEOUT_S)
        except InfraError as exc:
            self.error = str(exc)


def take_snapshot(
    kernel: PreparedKernel, userland: Userland, plan: QemuPlan, workdir: Path,
    image: Path, cancelled: Callable[[], bool],
) -> tuple[Snapshot | None, OomSnapshot, str]:  # fmt: skip
    """Boot the OOM guest to its probe and save it: (what to restore or None, the record,
    the saving boot's console). Never raises for what the guest did."""
    units = list(plan.oom.units)
    swap = swap_image(workdir, _oom_swap_bytes(plan, units), name="saved.swap.img")
    initrd = workdir / "saved.initrd"
    args = _oom_args(plan, [], swap is not None, saved=True)
    # virtio_blk for the plan disk, where the kernel builds it as a module.
    write_initrd(userland, cell_archive(args, _boot_modules(kernel, True)), initrd)
    plan_disk = workdir / "saved.plan.img"
    write_plan_disk(plan_disk, b"")
    # A unix socket path is limited to 108 bytes: kept short, outside the work directory.
    sockdir = Path(tempfile.mkdtemp(prefix="kmx-qmp-"))
    spec = replace(_oom_spec(plan, image, initrd, workdir, "saved"),
                   swap=swap, plan=plan_disk, qmp=sockdir / "qmp")  # fmt: skip
    saver = _Saver(spec.console_log, sockdir / "qmp", workdir / "saved.state")
    try:
        run = run_qemu(build_argv(spec), SAVE_BOOT_TIMEOUT_S + SAVE_TIMEOUT_S,
                       weight=len(units), cancelled=cancelled, watch=saver.poll)  # fmt: skip
    finally:
        plan_disk.unlink(missing_ok=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    console = _read(spec.console_log)
    record: OomSnapshot = {
        "duration_s": run.duration_s,
        "save_s": saver.saved.seconds if saver.saved else None,
        "size_bytes": saver.saved.size_bytes if saver.saved else None,
        "error": None if saver.saved else saver.error or _why_unsaved(run, console),
    }
    if saver.saved is None:
        for path in (initrd, swap, saver.state):
            if path is not None:
                path.unlink(missing_ok=True)
        return None, record, console
    return Snapshot(saver.saved.path, initrd, swap), record, console


def _why_unsaved(run: QemuRun, console: str) -> str:
    summary = analyze_console(console)
    if summary.panic:
        return f"the guest panicked before its probe was ready: {summary.panic}"
    if run.timed_out:
        return f"the probe was not ready within {SAVE_BOOT_TIMEOUT_S:.0f} s"
    return f"QEMU exited (status {run.returncode}) before the probe was ready"


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


def plan_lanes(units: list[Unit], split: int = 1) -> list[list[Unit]]:
    """The units split into boots that can run side by side (each lane a boot, at first).

    The repeats that do not end their boot run in ``split`` lanes (consecutive runs of the
    canonical order), the last of them followed by the first repeat that ends its boot
    (catalog.ENDS_BOOT, which the probe runs last); every further such repeat gets a lane of
    its own, so a cell's panics cost one boot each in parallel instead of in a row. More
    than one calm lane pays only when lanes are restores of one saved boot, not boots.
    """
    ending = [u for u in units if u.name in ENDS_BOOT]
    calm = [u for u in units if u.name not in ENDS_BOOT]
    size = max(1, -(-len(calm) // max(1, split)))
    lanes = [calm[i : i + size] for i in range(0, len(calm), size)] or [[]]
    lanes[-1] = lanes[-1] + ending[:1]
    return [lane for lane in (*lanes, *([u] for u in ending[1:])) if lane]


#: Lanes for the calm repeats when every lane is a restore (a second restore costs ~1 s of
#: CPU and halves the longest lane: one cell alone 75 s -> 65 s under TCG on 2 cores).
RESTORED_CALM_LANES = 2


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
    plus one per early end, restored from one saved boot when ``oom.snapshot`` is on (and
    the saving worked). QEMU's slots (backends.qemu) bound how many run at once.

    ``keep_workdir`` keeps each boot's raw console and result logs (for fixtures); ``image``
    is what QEMU boots (kmatrix.guest.bootimage), the kernel's vmlinuz by default; once
    ``cancel`` is set (the cell failed elsewhere) no lane starts another boot.
    """
    units = list(plan.oom.units)
    if not units:
        return OomRun([])
    workdir.mkdir(parents=True, exist_ok=True)
    counter = itertools.count(1)
    stop = cancel or threading.Event()
    image = image or kernel.vmlinuz
    snapshot, record, saved_console = None, None, ""
    if plan.oom.snapshot:
        snapshot, record, saved_console = take_snapshot(
            kernel, userland, plan, workdir, image, stop.is_set
        )
    lanes = plan_lanes(units, RESTORED_CALM_LANES if snapshot else 1)

    def boot(rest: list[Unit]) -> BootOutput:
        out = _boot(kernel, userland, plan, workdir, rest, next(counter), image, stop.is_set,
                    snapshot)  # fmt: skip
        if out.restored and out.probe.hello is None and not out.end.get("panic"):
            # QEMU could not load the saved state (its stderr said why): boot instead.
            out = _boot(kernel, userland, plan, workdir, rest, next(counter), image, stop.is_set)
        return out

    try:
        with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="oom-lane") as pool:
            per_lane = list(pool.map(lambda lane: _run_lane(lane, boot, stop.is_set), lanes))
    finally:
        if snapshot is not None:
            for path in (snapshot.state, snapshot.initrd, snapshot.swap):
                if path is not None:
                    path.unlink(missing_ok=True)
    # Numbered in lane order, whatever order the lanes finished in.
    boots = [replace(b, index=i) for i, b in enumerate(itertools.chain(*per_lane), 1)]
    result = OomRun(assemble(units, boots), snapshot=record, snapshot_console=saved_console)
    for b in boots:
        result.boots.append(b.summary())
        result.consoles.append(b.console)
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
