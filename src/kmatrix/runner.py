"""`invoke matrix`: resolve every kernel, build the guest, run each cell, write results and report.

Order matters for the user: everything that can be wrong with matrix.yaml (unknown package,
bad pin) is found before any kernel is downloaded, and results are written after every
cell so an interrupted run loses nothing it already measured.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kmatrix import __version__
from kmatrix.backends.qemu import kvm_smoke_test, qemu_version
from kmatrix.config import KernelConfig, Matrix, load_matrix
from kmatrix.debian import Archive, KernelPackages, default_cache_dir, resolve_mirror
from kmatrix.errors import KmatrixError, UserError
from kmatrix.guest import ROOT, Userland, build_userland, probe_sha256
from kmatrix.kernels import PreparedKernel, prepare_debian, prepare_local, resolve_debian
from kmatrix.qemu_cell import run_qemu_cell
from kmatrix.report import render_report
from kmatrix.results import JSON, SCHEMA_VERSION, atomic_write_text, new_cell, write_results

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunOptions:
    """What `invoke matrix` was asked to do."""

    matrix_path: Path = ROOT / "matrix.yaml"
    name: str = "latest"
    kernels: tuple[str, ...] = ()
    reports_dir: Path = ROOT / "reports"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _host_info() -> JSON:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _make_archive(matrix: Matrix, log: Log) -> Archive:
    check = matrix.check_valid_until and os.environ.get("KMATRIX_CHECK_VALID_UNTIL", "1") != "0"
    return Archive(
        resolve_mirror(matrix.mirror),
        default_cache_dir(),
        keyring=matrix.keyring,
        check_valid_until=check,
        log=log,
    )


def _resolve_all(archive: Archive, kernels: list[KernelConfig], log: Log) -> dict[str, KernelPackages]:
    """Resolve every Debian kernel up front: a typo fails before any large download."""
    resolved: dict[str, KernelPackages] = {}
    for k in kernels:
        if k.backend == "qemu" and k.path is None:
            pkgs = resolve_debian(archive, k)
            log(f"{k.name}: {k.source} -> {pkgs.primary.name} {pkgs.primary.version}")
            resolved[k.name] = pkgs
    return resolved


def _pick_accel(matrix: Matrix, kernel: PreparedKernel, workdir: Path, log: Log) -> str:
    if matrix.accel != "auto":
        return matrix.accel
    workdir.mkdir(parents=True, exist_ok=True)
    ok = kvm_smoke_test(kernel.vmlinuz, workdir)
    log(f"KVM smoke boot {'worked: using kvm' if ok else 'failed: using tcg'}")
    return "kvm" if ok else "tcg"


class _Run:
    """The state of one matrix run: its results document and where it is written."""

    def __init__(self, opts: RunOptions, matrix: Matrix, log: Log) -> None:
        self.opts, self.matrix, self.log = opts, matrix, log
        self.out_dir = opts.reports_dir / opts.name
        self.cache = default_cache_dir()
        self.results: JSON = {
            "schema_version": SCHEMA_VERSION,
            "run": {
                "name": opts.name,
                "started": _now(),
                "finished": None,
                "kmatrix_version": __version__,
                "probe_sha256": probe_sha256(),
                "host": _host_info(),
                "matrix": str(opts.matrix_path.name),
            },
            "cells": [],
        }

    def save(self) -> None:
        write_results(self.out_dir / "results.json", self.results)
        atomic_write_text(self.out_dir / "report.md", render_report(self.results))

    def add(self, cell: JSON) -> None:
        self.results["cells"].append(cell)
        self.save()
        self.log(f"{cell['id']}: {cell['status']} {cell.get('reason') or ''}".rstrip())

    def qemu_cell(self, kernel: KernelConfig, prepared: PreparedKernel, userland: Userland, accel: str) -> JSON:
        memory = kernel.memory or self.matrix.guest.memory
        shm = kernel.shm_size or self.matrix.guest.shm_size
        self.log(f"{kernel.name}: booting {prepared.release or prepared.vmlinuz.name} ({accel})")
        return run_qemu_cell(
            prepared,
            userland,
            self.matrix,
            workdir=self.cache / "work" / self.opts.name / kernel.name,
            console_dest=self.out_dir / "console" / f"{kernel.name}.log",
            accel=accel,
            memory_bytes=memory,
            shm_size=shm,
        )


def run_matrix(opts: RunOptions, log: Log = print) -> JSON:
    """Run the matrix and return the results document (also written to reports/NAME/)."""
    matrix = load_matrix(opts.matrix_path)
    kernels = matrix.select(list(opts.kernels))
    run = _Run(opts, matrix, log)
    archive = _make_archive(matrix, log)
    resolved = _resolve_all(archive, kernels, log)
    run.results["run"]["host"]["qemu"] = qemu_version()
    userland = build_userland(archive, matrix.guest.suite, run.cache, log)
    run.results["run"]["guest"] = {"suite": matrix.guest.suite, "packages": userland.packages}
    for k in kernels:
        run.add(_run_one(run, archive, k, resolved, userland))
    run.results["run"]["finished"] = _now()
    run.save()
    log(f"wrote {run.out_dir / 'report.md'} and results.json")
    return run.results


def _run_one(
    run: _Run, archive: Archive, k: KernelConfig, resolved: dict[str, KernelPackages], userland: Userland
) -> JSON:
    """One cell; an infrastructure failure becomes the cell's status, not the run's end."""
    if k.backend == "docker":
        cell = new_cell(k.name, "docker")
        cell.update(status="skipped", reason="the docker backend is not implemented yet")
        return cell
    try:
        if k.path is not None:
            prepared = prepare_local(k)
        else:
            run.log(f"{k.name}: fetching {resolved[k.name].primary.name}")
            prepared = prepare_debian(archive, k, resolved[k.name], run.cache)
        accel = _pick_accel(run.matrix, prepared, run.cache / "work", run.log)
        return run.qemu_cell(k, prepared, userland, accel)
    except UserError:
        raise
    except KmatrixError as exc:
        cell = new_cell(k.name, "qemu")
        cell.update(status="error", reason=str(exc))
        return cell


def summarize(results: JSON) -> tuple[int, str]:
    """Exit code and one-line summary: 0 when every cell is ok, 1 when any is not."""
    bad = [f"{c['id']} ({c['status']})" for c in results["cells"] if c["status"] != "ok"]
    if bad:
        return 1, f"{len(bad)} of {len(results['cells'])} cells not ok: {', '.join(bad)}"
    return 0, f"all {len(results['cells'])} cells ok"
