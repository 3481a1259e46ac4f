"""The saved OOM boot of a QEMU cell: booted once, saved when its probe is ready, restored by
every OOM lane (``oom.snapshot``, the default).

The saving boot's probe imports itself, prints probes/resume.py's MARK on the console and
polls an empty plan disk; a :class:`_Saver` polled by run_qemu sees the line and migrates the
guest to a file over QMP (backends.qmp). A restored boot is the saving boot's QemuSpec with
its own logs, a copy of its swap disk, a plan disk holding its units and ``-incoming`` on
the file: the same devices in the same order, as a restore needs. Under TCG a boot to the
probe costs about 6 s of CPU, a restore well under one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kmatrix.backends.qemu import QemuRun, QemuSpec, build_argv, run_qemu, write_plan_disk
from kmatrix.backends.qemu import read_log as _read
from kmatrix.backends.qmp import FALLBACK_HINT, save_and_quit
from kmatrix.catalog import probe_module
from kmatrix.cells.console import analyze_console
from kmatrix.cells.oom_guest import (
    boot_modules,
    oom_args,
    oom_spec,
    oom_swap_bytes,
    plan_arg,
    swap_image,
)
from kmatrix.cells.plan import QemuPlan
from kmatrix.errors import InfraError
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.userland import Userland, cell_archive, write_initrd
from kmatrix.results.contract_oom import OomSnapshot
from kmatrix.results.oom import Unit

#: The plan disk format and the ready line: probes/resume.py's own constants.
_RESUME = probe_module("resume")

#: Seconds the saving boot may take to reach the probe (a boot takes 3-8 s under TCG).
READY_TIMEOUT_S = 90.0
#: Seconds for writing the saved state (about 0.2 s for a 192M guest).
SAVE_TIMEOUT_S = 60.0
#: Seconds to wait, after the saving QEMU exited, for ``cat`` to finish the state file.
STATE_WAIT_S = 30.0


@dataclass(frozen=True)
class Snapshot:
    """A cell's OOM boot saved while its probe waited for a plan: what each lane restores."""

    spec: QemuSpec  # the saving boot's: a restore must have its devices, initrd and kernel
    state: Path  # the saved guest (backends.qmp)

    def files(self) -> list[Path]:
        """What the snapshot keeps on disk until the cell's lanes are done."""
        return [p for p in (self.state, self.spec.initrd, self.spec.swap) if p is not None]


def plan_block(units: list[Unit]) -> bytes:
    """A plan disk's first block for ``units`` (probes/resume.py parse_block reads it)."""
    block = bytes(_RESUME.MAGIC) + plan_arg(units).encode("ascii") + b"\n"
    if len(block) > _RESUME.BLOCK:
        raise InfraError(
            f"the OOM plan of {len(units)} repeats needs {len(block)} bytes, more than the "
            f"{_RESUME.BLOCK} the probe reads from its plan disk; {FALLBACK_HINT}"
        )
    return block


def restored_spec(snapshot: Snapshot, workdir: Path, name: str, swap: Path | None,
                  plan_disk: Path) -> QemuSpec:  # fmt: skip
    """The QEMU of a boot restored from ``snapshot``: the saving boot's, but for its logs,
    its swap and plan disks (same devices, other files) and ``-incoming``."""
    return replace(
        snapshot.spec,
        console_log=workdir / f"{name}.console.log",
        result_log=workdir / f"{name}.results.log",
        swap=swap,
        plan=plan_disk,
        qmp=None,
        incoming=snapshot.state,
    )


class _Saver:
    """Watches the saving boot's console; once the probe says it waits, saves and quits."""

    def __init__(self, console: Path, qmp: Path, state: Path) -> None:
        self.console, self.qmp, self.state = console, qmp, state
        self.save_s: float | None = None
        self.error: str | None = None

    def poll(self) -> None:
        """Called by run_qemu while QEMU runs: never raises, a failure is recorded."""
        if self.save_s is not None or self.error or _RESUME.MARK not in _read(self.console):
            return
        try:
            self.save_s = save_and_quit(self.qmp, self.state, SAVE_TIMEOUT_S)
        except InfraError as exc:
            self.error = str(exc)
        except Exception as exc:  # a fallback exists: saving never fails the cell
            self.error = f"saving the guest failed: {type(exc).__name__}: {exc}; {FALLBACK_HINT}"


def take_snapshot(
    kernel: PreparedKernel, userland: Userland, plan: QemuPlan, workdir: Path,
    image: Path, cancelled: Callable[[], bool],
) -> tuple[Snapshot | None, OomSnapshot, str]:  # fmt: skip
    """Boot the OOM guest to its probe and save it: (what to restore or None, the record,
    the saving boot's console). Never raises for what the guest did."""
    units = list(plan.oom.units)
    initrd, state = workdir / "saved.initrd", workdir / "saved.state"
    swap = swap_image(workdir, oom_swap_bytes(plan, units), name="saved.swap.img")
    plan_disk = workdir / "saved.plan.img"
    # A unix socket path is limited to 108 bytes: kept short, outside the work directory.
    sockdir = Path(tempfile.mkdtemp(prefix="kmx-qmp-"))
    saver = _Saver(workdir / "saved.console.log", sockdir / "qmp", state)
    kept = False
    try:
        # The plan disk needs virtio_blk, where the kernel builds it as a module.
        write_initrd(userland, cell_archive(oom_args(plan, [], swap is not None, saved=True),
                                            boot_modules(kernel, True)), initrd)  # fmt: skip
        write_plan_disk(plan_disk, b"")
        spec = replace(oom_spec(plan, image, initrd, workdir, "saved"),
                       swap=swap, plan=plan_disk, qmp=saver.qmp)  # fmt: skip
        run = run_qemu(build_argv(spec), READY_TIMEOUT_S + SAVE_TIMEOUT_S,
                       weight=len(units), cancelled=cancelled, watch=saver.poll)  # fmt: skip
        console = _read(spec.console_log)
        error = _why_unsaved(run, console, saver) or _await_state(state)
        record: OomSnapshot = {
            "duration_s": run.duration_s,
            "save_s": None if error else saver.save_s,
            "size_bytes": None if error else state.stat().st_size,
            "error": error,
        }
        kept = error is None
        return (Snapshot(spec, state) if kept else None), record, console
    finally:
        plan_disk.unlink(missing_ok=True)
        shutil.rmtree(sockdir, ignore_errors=True)
        if not kept:
            for path in (initrd, swap, state, state.with_name(state.name + ".part")):
                if path is not None:
                    path.unlink(missing_ok=True)


def _why_unsaved(run: QemuRun, console: str, saver: _Saver) -> str | None:
    """Why the saving boot left nothing to restore, or None when it saved the guest."""
    if saver.error:
        return saver.error
    if saver.save_s is not None and not run.timed_out:
        return None
    summary = analyze_console(console)
    if summary.panic:
        return f"the guest panicked before its probe was ready: {summary.panic}; {FALLBACK_HINT}"
    if run.timed_out:
        limit = READY_TIMEOUT_S + SAVE_TIMEOUT_S
        return f"the probe was not ready and saved within {limit:.0f} s; {FALLBACK_HINT}"
    said = "; ".join(run.stderr.strip().splitlines()[-2:]) or "no error output"
    return f"QEMU exited (status {run.returncode}) before it was saved: {said}; {FALLBACK_HINT}"


def _await_state(state: Path) -> str | None:
    """Wait for the state file QEMU's ``cat`` renames into place; None once it is there."""
    deadline = time.monotonic() + STATE_WAIT_S
    while not state.exists():
        if time.monotonic() > deadline:
            return f"the saved state {state} was never completed; {FALLBACK_HINT}"
        time.sleep(0.05)
    return None
