"""One QEMU cell: build its initrd and disk, boot it, and turn what came back into a result."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kmatrix.backends.qemu import QemuRun, QemuSpec, arch_for, build_argv, make_disk, run_qemu
from kmatrix.config import Matrix
from kmatrix.console import ConsoleSummary, analyze_console
from kmatrix.guest import Userland, cell_archive, write_initrd
from kmatrix.kernels import PreparedKernel
from kmatrix.kmods import modules_to_load
from kmatrix.oom_cell import run_oom_boots
from kmatrix.repeats import aggregate_scenarios
from kmatrix.results import JSON, ProbeOutput, new_cell, parse_probe_output


def classify(run: QemuRun, console: ConsoleSummary, probe: ProbeOutput) -> tuple[str, str]:
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


def cell_args(matrix: Matrix, shm_size: int) -> dict[str, str]:
    """The parameters /init reads from /kmatrix/args."""
    scenarios = matrix.probe.scenarios
    return {
        "KMX_MODE": "accounting",
        "KMX_SIZE_MIB": str(matrix.probe.size // (1024 * 1024)),
        "KMX_SHM_SIZE": str(shm_size),
        "KMX_SCENARIOS": scenarios if isinstance(scenarios, str) else ",".join(scenarios),
        "KMX_REPEATS": str(matrix.probe.repeats),
    }


def run_qemu_cell(
    kernel: PreparedKernel,
    userland: Userland,
    matrix: Matrix,
    workdir: Path,
    console_dest: Path,
    accel: str,
    memory_bytes: int,
    shm_size: int,
) -> JSON:
    """Boot one kernel with the probe and return its results.json cell (any status)."""
    cell = new_cell(kernel.name, "qemu")
    arch = arch_for(kernel.arch)
    cell.update(accel=accel, memory_bytes=memory_bytes, arch=arch.name)
    cell["kernel"] = _kernel_info(kernel)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    modules = modules_to_load(kernel.modules_dir, arch.guest_modules) if kernel.modules_dir else []
    args = cell_args(matrix, shm_size) | {"KMX_RESULT_DEV": arch.result_device}
    initrd = workdir / "initrd.cpio"
    write_initrd(userland, cell_archive(args, modules), initrd)
    disk = workdir / "disk.img"
    make_disk(disk, matrix.guest.disk_size)
    spec = QemuSpec(
        vmlinuz=kernel.vmlinuz,
        initrd=initrd,
        console_log=workdir / "console.log",
        result_log=workdir / "results.log",
        memory_bytes=memory_bytes,
        accel=accel,
        disk=disk,
        append=kernel.cmdline,
        arch=arch,
    )
    run = run_qemu(build_argv(spec), timeout=matrix.probe.cell_timeout)
    console_text = _read(spec.console_log)
    console = analyze_console(console_text)
    probe = parse_probe_output(_read(spec.result_log).splitlines())
    console_dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.console_log, console_dest)
    status, reason = classify(run, console, probe)
    cell.update(status=status, reason=reason, duration_s=run.duration_s)
    if console.release:
        cell["kernel"]["release"] = console.release
    cell["scenarios"] = aggregate_scenarios(probe.scenarios)
    cell["probe"] = probe.hello or {}
    if status != "ok":
        cell["console_tail"] = console.tail
    disk.unlink(missing_ok=True)
    initrd.unlink(missing_ok=True)
    if console.reached_init:  # a kernel that cannot boot our init cannot run OOM boots either
        _run_oom(cell, kernel, userland, matrix, workdir / "oom", accel, console_dest)
    return cell


def _run_oom(
    cell: JSON, kernel: PreparedKernel, userland: Userland, matrix: Matrix, workdir: Path,
    accel: str, console_dest: Path,
) -> None:  # fmt: skip
    """The OOM boots (kmatrix.oom_cell): results in cell["oom"], consoles appended."""
    oom = run_oom_boots(kernel, userland, matrix, workdir, accel)
    if not oom.boots:
        return
    cell["oom"] = oom.experiments
    cell["oom_boots"] = oom.boots
    cell["oom_memory_bytes"] = matrix.oom.memory
    cell["oom_duration_s"] = round(sum(b["duration_s"] for b in oom.boots), 2)
    cell["duration_s"] = round(cell["duration_s"] + cell["oom_duration_s"], 2)
    with console_dest.open("a") as f:
        for boot, text in zip(oom.boots, oom.consoles, strict=True):
            f.write(f"\n===== kmatrix OOM boot {boot['index']} ({boot['units']} repeats) =====\n")
            f.write(text)


def _kernel_info(kernel: PreparedKernel) -> dict[str, Any]:
    info = {"name": kernel.name, "release": kernel.release, "config": kernel.config} | {
        k: kernel.provenance.get(k) for k in ("package", "version", "sha256", "suite", "packages")
    }
    return info | {"arch": kernel.arch}


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
