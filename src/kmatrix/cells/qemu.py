"""One QEMU cell: build its initrd and disk, boot it, and turn what came back into a result."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

from kmatrix.backends.qemu import (
    QemuRun,
    QemuSpec,
    arch_for,
    build_argv,
    make_disk,
    run_qemu,
    slot_count,
)
from kmatrix.backends.qemu import read_log as _read
from kmatrix.cells.console import ConsoleSummary, analyze_console
from kmatrix.cells.oom_boots import (
    EARLY_CRASH_MARK,
    EARLY_CRASH_RETRIES,
    OomRun,
    crashed_early,
    run_oom_boots,
)
from kmatrix.cells.oom_guest import swap_image
from kmatrix.cells.plan import QemuPlan
from kmatrix.errors import QemuFailedToStart as QemuFailedToStart
from kmatrix.guest.bootimage import boot_file
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.kmods import modules_to_load
from kmatrix.guest.userland import Userland, cell_archive, write_initrd
from kmatrix.results.contract import Cell, CellStatus, KernelInfo
from kmatrix.results.contract_oom import OomSnapshot
from kmatrix.results.oomlog import condense_floods
from kmatrix.results.repeats import aggregate_scenarios
from kmatrix.results.schema import ProbeOutput, new_cell, parse_probe_output


def classify(run: QemuRun, console: ConsoleSummary, probe: ProbeOutput) -> tuple[CellStatus, str]:
    """Decide a cell's status and reason from how QEMU ended and what came back.

    A complete probe report is ``ok`` whatever happened after it; otherwise a panic wins
    over a timeout (a panicked guest may also hang), and anything else is an ``error``.
    """
    if probe.complete:
        return "ok", ""
    if console.panic:
        return "panic", f"kernel panic: {console.panic}"
    if run.timed_out:
        where = console.init_marks[-1] if console.init_marks else "before init started"
        return "timeout", f"no complete result before the timeout; last init step: {where}"
    if probe.problems:
        return "error", "probe output unusable: " + "; ".join(probe.problems[:3])
    if probe.hello is None:
        tail = run.stderr.strip().splitlines()[-1:] or ["no QEMU error output"]
        return "error", f"no result from the guest (QEMU exit {run.returncode}: {tail[0]})"
    return "error", f"probe stopped after {len(probe.scenarios)} scenarios without finishing"


def cell_args(plan: QemuPlan) -> dict[str, str]:
    """The parameters /init reads from /kmatrix/args."""
    scenarios = plan.probe.scenarios
    return {
        "KMX_MODE": "accounting",
        "KMX_SIZE_MIB": str(plan.probe.size_bytes // (1024 * 1024)),
        "KMX_SHM_SIZE": str(plan.shm_size),
        "KMX_SCENARIOS": scenarios if isinstance(scenarios, str) else ",".join(scenarios),
        "KMX_SWAP": "1" if plan.swap_bytes else "0",
        "KMX_REPEATS": str(plan.probe.repeats),
    }


def run_qemu_cell(
    kernel: PreparedKernel, userland: Userland, plan: QemuPlan, workdir: Path, console_dest: Path
) -> Cell:
    """Boot one kernel as ``plan`` says, with the probe; its results.json cell (any status)."""
    cell = new_cell(plan.name, "qemu")
    arch = arch_for(plan.arch)
    cell |= {
        "accel": plan.accel,
        "memory_bytes": plan.memory_bytes,
        "arch": arch.name,
        "cpu": plan.cpu,
    }
    if plan.tcg_thread is not None:  # TCG cells only
        cell["tcg_thread"] = plan.tcg_thread
    cell["qemu_slots"] = slot_count()
    cell["kernel"] = kernel_info(kernel)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    image, entry = boot_file(kernel.vmlinuz, arch.name, workdir / "vmlinux")
    cell["boot"] = entry
    spec = _accounting_spec(kernel, userland, plan, workdir, image)
    started = time.monotonic()
    booted, cancel = threading.Event(), threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="oom") as pool:
        oom_future = pool.submit(
            _oom_once_booted, spec.console_log, booted, kernel, userland, plan,
            workdir / "oom", image, cancel,
        )  # fmt: skip
        try:
            run, console_text, earlier = _boot_until_probe(
                spec, plan.cell_timeout_s, plan.probe.runs
            )
        except BaseException:
            cancel.set()  # the cell has failed: its OOM lanes start no further boot
            raise
        finally:
            booted.set()
        oom = oom_future.result()
    console = analyze_console(console_text)
    probe = parse_probe_output(_read(spec.result_log).splitlines())
    console_dest.parent.mkdir(parents=True, exist_ok=True)
    # QEMU killed before it opened its console: an empty log, not a crash.
    console_dest.write_text(earlier + console_text)
    if earlier:
        cell["early_crashes"] = earlier.count(EARLY_CRASH_MARK)
    status, reason = classify(run, console, probe)
    cell |= {"status": status, "reason": reason, "duration_s": run.duration_s}
    if console.release:
        cell["kernel"]["release"] = console.release
    cell["scenarios"] = aggregate_scenarios(probe.scenarios)
    cell["probe"] = probe.hello or {}
    if status != "ok":
        cell["console_tail"] = console.tail
    for path in (spec.disk, spec.initrd, spec.swap):
        if path is not None:
            path.unlink(missing_ok=True)
    if oom is not None:
        _record_oom(cell, oom, plan, console_dest)
    if image != kernel.vmlinuz:
        image.unlink(missing_ok=True)
    cell["wall_s"] = round(time.monotonic() - started, 2)
    return cell


def _accounting_spec(
    kernel: PreparedKernel, userland: Userland, plan: QemuPlan, workdir: Path, image: Path
) -> QemuSpec:
    """The accounting boot: its initrd (userland, probe, modules, args) and disks, written."""
    arch = arch_for(plan.arch)
    modules = modules_to_load(kernel.modules_dir, arch.guest_modules) if kernel.modules_dir else []
    args = cell_args(plan) | {"KMX_RESULT_DEV": arch.result_device}
    initrd = workdir / "initrd.cpio"
    write_initrd(userland, cell_archive(args, modules), initrd)
    disk = workdir / "disk.img"
    make_disk(disk, plan.disk_bytes)
    return QemuSpec(
        vmlinuz=image,
        initrd=initrd,
        console_log=workdir / "console.log",
        result_log=workdir / "results.log",
        memory_bytes=plan.memory_bytes,
        accel=plan.accel,
        tcg_thread=plan.tcg_thread,
        disk=disk,
        swap=swap_image(workdir, plan.swap_bytes),
        cpus=plan.cpus,
        append=plan.cmdline,
        arch=arch,
    )


def _oom_once_booted(
    console_log: Path, accounting_ended: threading.Event, kernel: PreparedKernel,
    userland: Userland, plan: QemuPlan, workdir: Path, image: Path, cancel: threading.Event,
) -> OomRun | None:  # fmt: skip
    """The OOM boots, started alongside the accounting boot once its init has printed (a
    kernel that cannot boot our init cannot run OOM boots either: None then)."""
    while not _init_started(console_log):
        if accounting_ended.wait(0.25):
            if not _init_started(console_log):
                return None
            break
    return run_oom_boots(kernel, userland, plan, workdir, image=image, cancel=cancel)


def _init_started(console_log: Path) -> bool:
    return analyze_console(_read(console_log)).reached_init


def _check_started(run: QemuRun, console_text: str, spec: QemuSpec) -> None:
    """A QEMU that failed before the guest printed anything is kmatrix's error, not a result.

    It is an InfraError carrying QEMU's own words, so the run stops with one clear line.
    """
    # A negative code is a signal from outside (someone killed QEMU): the cell's error.
    if run.timed_out or run.returncode is None or run.returncode <= 0 or console_text.strip():
        return
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    said = "; ".join(lines[-3:]) or "no error output"
    raise QemuFailedToStart(
        f"{spec.arch.binary} exited at once (status {run.returncode}) before the guest printed "
        f"anything: {said[:500]}; check the kernel file {spec.vmlinuz} (a vmlinux is the one "
        "kmatrix took out of the package's bzImage, guest/bootimage.py) and the QEMU installation"
    )


def _record_oom(cell: Cell, oom: OomRun, plan: QemuPlan, console_dest: Path) -> None:
    """The OOM boots' results in cell["oom"], their consoles appended to the cell's."""
    if not oom.boots:
        return
    cell["oom"] = oom.experiments
    cell["oom_boots"] = oom.boots
    cell["oom_memory_bytes"] = plan.oom.memory_bytes
    saving_s = 0.0
    if oom.snapshot is not None:
        cell["oom_snapshot"] = oom.snapshot
        saving_s = oom.snapshot["duration_s"]
    # Boot time summed: the boots run side by side, so this is more than the wall time.
    cell["oom_duration_s"] = round(sum(b["duration_s"] for b in oom.boots) + saving_s, 2)
    cell["duration_s"] = round(cell["duration_s"] + cell["oom_duration_s"], 2)
    with console_dest.open("a") as f:
        if oom.snapshot is not None:
            f.write(_saved_header(oom.snapshot))
            f.write(oom.snapshot_console)
        for boot, text in zip(oom.boots, oom.consoles, strict=True):
            how = f"{boot['units']} repeats" + (", restored" if boot.get("restored") else "")
            f.write(f"\n===== kmatrix OOM boot {boot['index']} ({how}) =====\n")
            f.write(condense_floods(text)[0])  # parsed in full already (results.oom)


def _saved_header(saved: OomSnapshot) -> str:
    if saved["error"] is None:
        said = (
            "booted to the probe and saved; the OOM boots below that say restored started from it"
        )
    else:
        said = f"booted to be saved, but not saved ({saved['error']})"
    return f"\n===== kmatrix OOM boot 0: {said} =====\n"


# Where the kernel came from: the same for every run of one package, except the stale-pin
# note, which follows the archive; a cached cell gets these refreshed (kmatrix.run.pool).
PROVENANCE_KEYS = (
    "package", "version", "sha256", "suite", "packages",
    "archive", "archive_url", "suites", "skipped_suites", "stale_pin",
    "path", "modules", "modules_sha256", "config_file", "config_sha256", "build_sha256",
)  # fmt: skip


def _boot_until_probe(spec: QemuSpec, timeout: float, weight: float) -> tuple[QemuRun, str, str]:
    """Boot; again (EARLY_CRASH_RETRIES times at most) while it panics before the probe.

    Returns the last run, its console and the consoles of the boots that crashed early.
    """
    earlier = ""
    for _ in range(EARLY_CRASH_RETRIES):
        run, console_text = _boot_once(spec, timeout, weight)
        hello = parse_probe_output(_read(spec.result_log).splitlines()).hello
        if not crashed_early(hello, analyze_console(console_text).panic):
            return run, console_text, earlier
        earlier += f"{console_text}\n{EARLY_CRASH_MARK} =====\n"
    run, console_text = _boot_once(spec, timeout, weight)
    return run, console_text, earlier


def _boot_once(spec: QemuSpec, timeout: float, weight: float) -> tuple[QemuRun, str]:
    run = run_qemu(build_argv(spec), timeout=timeout, weight=weight)
    console_text = _read(spec.console_log)
    _check_started(run, console_text, spec)
    return run, console_text


def kernel_info(kernel: PreparedKernel) -> KernelInfo:
    """The results' ``kernel`` entry of a cell: release, config and provenance."""
    info: KernelInfo = {"name": kernel.name, "release": kernel.release, "config": kernel.config}
    # Keys a source does not have (a local build has no suite) are left out, not null,
    # except the ones every cell has always had.
    always = ("package", "version", "sha256", "suite", "packages")
    # PreparedKernel.provenance is untyped (guest/kernels.py, debian/suites.py): its keys
    # are PROVENANCE_KEYS, each typed in KernelInfo.
    provenance = cast(KernelInfo, {k: kernel.provenance.get(k) for k in PROVENANCE_KEYS
                                   if k in always or k in kernel.provenance})  # fmt: skip
    return info | provenance | {"arch": kernel.arch}
