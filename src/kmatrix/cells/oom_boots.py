"""The OOM boots of a QEMU cell: run every (experiment, repeat) unit in as few boots as can be.

One boot runs the units in the probe's order (oom-memcg-v1 first, oom-no-killable last);
the repeats that end their boot in a panic after the first get boots of their own, run
alongside it (plan_lanes). A boot that ends early — the expected panic of oom-no-killable,
or an unexpected panic or hang — costs only the unit that was running (the probe announced
it with a ``start`` record): that unit is recorded from the console and the next boot runs
what is left. The OOM boots use their own guest memory (``oom.memory``), not the accounting
boot's.

With ``oom.snapshot`` (the default) the kernel is booted once per cell: that boot is saved
when its probe is ready (oom_saved.py) and every boot above is a restore of it, told its
units by a plan disk of its own: one restore per repeat that ends its boot, the calm repeats
split over them, at least two (restored_split). If the
saving boot fails, the lanes boot; a restore that brings back no hello is kept as a boot of
its own and its units are booted.
"""

from __future__ import annotations

import itertools
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from kmatrix.backends.qemu import QemuRun, build_argv, copy_sparse, run_qemu, write_plan_disk
from kmatrix.backends.qemu import read_log as _read
from kmatrix.catalog import ENDS_BOOT
from kmatrix.cells.console import analyze_console
from kmatrix.cells.oom_guest import boot_modules, oom_args, oom_spec, oom_swap_bytes, swap_image
from kmatrix.cells.oom_saved import Snapshot, plan_block, restored_spec, take_snapshot
from kmatrix.cells.plan import OomPlan, QemuPlan
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.userland import Userland, cell_archive, write_initrd
from kmatrix.results.contract import Hello
from kmatrix.results.contract_oom import OomBoot, OomExperiment, OomSnapshot
from kmatrix.results.oom import BootEnd, BootOutput, Unit, assemble
from kmatrix.results.schema import parse_probe_output

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


@dataclass
class OomRun:
    """Everything the OOM boots of one cell produced."""

    experiments: list[OomExperiment]
    boots: list[OomBoot] = field(default_factory=list)
    consoles: list[str] = field(default_factory=list)
    snapshot: OomSnapshot | None = None  # the saved boot the others were restored from
    snapshot_console: str = ""


#: Between the consoles of a boot that panicked before its probe started and the next.
EARLY_CRASH_MARK = "===== kmatrix: this boot panicked before the probe started; booted again"
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
    snapshot: Snapshot | None = None,
) -> BootOutput:  # fmt: skip
    """One OOM boot running ``units``, booted or restored from ``snapshot``; returns what
    came back (never raises on a panic)."""
    name = f"oom-{index}"
    made: list[Path] = []  # this boot's own files, removed after it
    try:
        if snapshot is None:
            swap = swap_image(workdir, oom_swap_bytes(plan, units), name=f"{name}.swap.img")
            initrd = workdir / f"{name}.initrd"
            made += [initrd, *([swap] if swap else [])]
            args = oom_args(plan, units, swap is not None, saved=False)
            write_initrd(userland, cell_archive(args, boot_modules(kernel, swap is not None)),
                         initrd)  # fmt: skip
            spec = replace(oom_spec(plan, image, initrd, workdir, name), swap=swap)
        else:
            swap = workdir / f"{name}.swap.img" if snapshot.spec.swap else None
            plan_disk = workdir / f"{name}.plan.img"
            made += [plan_disk, *([swap] if swap else [])]
            if snapshot.spec.swap is not None and swap is not None:
                copy_sparse(snapshot.spec.swap, swap)  # formatted by the saving boot's init
            write_plan_disk(plan_disk, plan_block(units))
            spec = restored_spec(snapshot, workdir, name, swap, plan_disk)
        # Weighed by its repeats: the main boot gets a slot before the panicking repeats'.
        run = run_qemu(
            build_argv(spec), _boot_timeout(plan.oom, units), weight=len(units),
            cancelled=cancelled,
        )  # fmt: skip
    finally:
        for path in made:
            path.unlink(missing_ok=True)
    console = _read(spec.console_log)
    probe = parse_probe_output(_read(spec.result_log).splitlines())
    if snapshot is not None and probe.hello is None and run.stderr.strip():
        console += f"\n===== QEMU (restoring {snapshot.state.name}): {run.stderr.strip()}\n"
    return BootOutput(index, units, probe, console, _boot_end(run, console), snapshot is not None)


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
    canonical order); each of the first ``split`` repeats that end their boot
    (catalog.ENDS_BOOT, which the probe runs last) closes one of them, and every further
    such repeat gets a lane of its own, so a cell's panics cost one boot each in parallel
    instead of in a row. More than one calm lane pays only when lanes are restores of one
    saved boot, not boots.
    """
    ending = [u for u in units if u.name in ENDS_BOOT]
    calm = [u for u in units if u.name not in ENDS_BOOT]
    n = max(1, min(split, len(calm)))  # even cuts: lane lengths differ by one at most
    lanes = [calm[len(calm) * i // n : len(calm) * (i + 1) // n] for i in range(n)]
    closed = [lane + ending[i : i + 1] for i, lane in enumerate(lanes)]
    return [lane for lane in (*closed, *([u] for u in ending[len(lanes) :])) if lane]


#: Calm lanes at least, when every lane is a restore (a second restore costs ~1 s of CPU
#: and halves the longest lane: one cell alone, 6.12, 75 s -> 63 s under TCG, 2 cores).
RESTORED_CALM_LANES = 2


def restored_split(units: list[Unit]) -> int:
    """Calm lanes when every lane is a restore: one per repeat that ends its boot (each
    of those needs a restore of its own anyway, so the calm repeats ride along at no cost
    in restores), at least RESTORED_CALM_LANES."""
    return max(RESTORED_CALM_LANES, sum(u.name in ENDS_BOOT for u in units))


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
    for _ in range(EARLY_CRASH_RETRIES + 1 if plan.oom.snapshot else 0):
        snapshot, record, console = take_snapshot(kernel, userland, plan, workdir, image,
                                                  stop.is_set)  # fmt: skip
        saved_console += console
        if snapshot or not crashed_early(None, analyze_console(console).panic):
            break
        saved_console += f"\n{EARLY_CRASH_MARK} =====\n"
    lanes = plan_lanes(units, restored_split(units) if snapshot else 1)
    failed: list[BootOutput] = []  # restores that came back without a hello
    broken = threading.Event()  # after one, no lane restores again

    def boot(rest: list[Unit]) -> BootOutput:
        saved = None if broken.is_set() else snapshot
        out = _boot(kernel, userland, plan, workdir, rest, next(counter), image, stop.is_set,
                    saved)  # fmt: skip
        if out.restored and out.probe.hello is None:
            # QEMU could not load the state (its stderr is in the console), or the restored
            # guest died before its probe went on: kept as a boot of its own; boot instead.
            broken.set()
            failed.append(out)
            out = _boot(kernel, userland, plan, workdir, rest, next(counter), image, stop.is_set)
        return out

    try:
        with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="oom-lane") as pool:
            per_lane = list(pool.map(lambda lane: _run_lane(lane, boot, stop.is_set), lanes))
    finally:
        for path in snapshot.files() if snapshot else []:
            path.unlink(missing_ok=True)
    # Numbered in lane order, whatever order the lanes finished in; failed restores last.
    boots = list(itertools.chain(*per_lane))
    numbered = [replace(b, index=i) for i, b in enumerate([*boots, *failed], 1)]
    result = OomRun(assemble(units, numbered[: len(boots)]), snapshot=record,
                    snapshot_console=saved_console)  # fmt: skip
    for b in numbered:
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
