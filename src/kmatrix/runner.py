"""`invoke matrix`: resolve every kernel, build the guest, run the cells, write results and report.

Order matters for the user: everything that can be wrong with matrix.yaml (unknown package,
bad pin) is found before any kernel is downloaded; cells run in parallel (``--jobs``);
results are written after every cell so an interrupted run loses nothing it measured, and
the result cache lets the next run pick up where this one stopped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kmatrix import __version__
from kmatrix.backends import docker as docker_backend
from kmatrix.backends import qemu
from kmatrix.cellcache import CellCache, cell_key
from kmatrix.check import enforce
from kmatrix.config import KernelConfig, Matrix, load_matrix
from kmatrix.debian import Archive, KernelPackages, default_cache_dir, resolve_mirror
from kmatrix.docker_cell import run_docker_cell
from kmatrix.errors import InfraError, KmatrixError, UserError
from kmatrix.guest import INIT_FILE, Userland, build_userland, probe_sha256
from kmatrix.interrupt import sigterm_as_interrupt
from kmatrix.kernels import PreparedKernel, prepare_debian, prepare_local, resolve_debian
from kmatrix.progress import Progress
from kmatrix.qemu_cell import run_qemu_cell
from kmatrix.report import write_report
from kmatrix.results import JSON, SCHEMA_VERSION, new_cell, write_results


@dataclass(frozen=True)
class RunOptions:
    """What `invoke matrix` was asked to do."""

    matrix_path: Path = Path("matrix.yaml")  # of the working directory, like reports/
    name: str = "latest"
    kernels: tuple[str, ...] = ()
    reports_dir: Path = Path("reports")
    jobs: int = 0  # 0: one per CPU core
    force: bool = False  # rerun cells even when the result cache has them
    accel: Literal["tcg", "kvm", "auto"] | None = None  # overrides matrix.yaml's accel


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _host_info() -> JSON:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _resolve_all(
    archives: dict[str, Archive], kernels: list[KernelConfig], progress: Progress
) -> dict[str, KernelPackages]:
    """Resolve every Debian kernel up front: a typo fails before any large download."""
    resolved: dict[str, KernelPackages] = {}
    for k in kernels:
        if k.backend == "qemu" and k.path is None:
            try:
                pkgs = resolve_debian(archives[k.arch], k)
            except UserError as exc:
                raise UserError(f"matrix.yaml kernel {k.name!r}: {exc}") from None
            progress.log(f"{k.name}: {k.source} -> {pkgs.primary.name} {pkgs.primary.version}")
            resolved[k.name] = pkgs
    return resolved


class _Run:
    """The state of one matrix run: its results document, where it goes, shared resources."""

    def __init__(
        self, opts: RunOptions, matrix: Matrix, kernels: list[KernelConfig], progress: Progress
    ) -> None:
        self.opts, self.matrix, self.kernels, self.progress = opts, matrix, kernels, progress
        self.out_dir = opts.reports_dir / opts.name
        self.cache = default_cache_dir()
        self.cell_cache = CellCache(self.cache / "cells")
        self._lock = threading.Lock()
        self._accel: str | None = None
        # Per Debian architecture (amd64 always; arm64 when a kernel asks for it).
        self.archives: dict[str, Archive] = {}
        self.userlands: dict[str, Userland] = {}
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

    def save(self, final: bool = False) -> None:
        """Write results.json and report.md as they stand (cells in matrix order).

        Charts take seconds to draw, so they are drawn only once, at the end of the run.
        """
        with self._lock:
            order = {k.name: i for i, k in enumerate(self.kernels)}
            self.results["cells"].sort(key=lambda c: order.get(c["id"], len(order)))
            write_results(self.out_dir / "results.json", self.results)
            write_report(self.results, self.out_dir, charts=final)

    def add(self, cell: JSON) -> None:
        """Record a finished cell and save at once."""
        with self._lock:
            self.results["cells"].append(cell)
        self.save()
        origin = " (cached)" if cell.get("cached") else ""
        self.progress.finish(
            cell["id"], f"{cell['status']}{origin} {cell.get('reason') or ''}".rstrip()
        )

    def accel(self, kernel: PreparedKernel) -> str:
        """The accelerator for every cell of this run (a KVM smoke boot decides ``auto``, once)."""
        with self._lock:
            if self._accel is None:
                self._accel = self.matrix.accel
                if self._accel == "auto":
                    work = self.cache / "work"
                    work.mkdir(parents=True, exist_ok=True)
                    self._accel = "kvm" if qemu.kvm_smoke_test(kernel.vmlinuz, work) else "tcg"
                    self.progress.log(f"KVM smoke boot chose {self._accel}")
            return self._accel


def _cache_key(
    run: _Run, k: KernelConfig, prepared: PreparedKernel, userland: Userland, accel: str
) -> str:
    return cell_key(
        {
            # The name is the cell's id in the results: two cells of one kernel are two entries.
            "name": k.name,
            "kernel": prepared.provenance.get("sha256"),
            "userland": userland.key,
            "probe": run.results["run"]["probe_sha256"],
            "init": hashlib.sha256(INIT_FILE.read_bytes()).hexdigest(),
            # What is measured, not how the run is checked or where packages come from.
            "matrix": run.matrix.model_dump(mode="json", include={"guest", "probe", "oom"}),
            "memory": k.memory,
            "cmdline": k.cmdline,
            "shm_size": k.shm_size,
            "accel": accel,
            "qemu": _qemu_version_of(run.results["run"]["host"], k.arch),
            "arch": k.arch,
        }
    )


def _qemu_version_of(host: JSON, arch: str) -> str | None:
    """The recorded version of the QEMU binary that boots ``arch`` guests."""
    return host.get("qemu") if arch == "amd64" else host.get(f"qemu_{arch}")


def _qemu_cell(
    run: _Run, archive: Archive, k: KernelConfig, pkgs: KernelPackages | None, userland: Userland
) -> JSON:
    archive = run.archives.get(k.arch, archive)
    userland = run.userlands.get(k.arch, userland)
    if k.path is not None:
        prepared = prepare_local(k)
    else:
        assert pkgs is not None
        run.progress.phase(k.name, f"fetch {pkgs.primary.name}")
        prepared = prepare_debian(archive, k, pkgs, run.cache)
    # KVM runs only guests of the host's own architecture: anything else is TCG.
    native = qemu.arch_for(k.arch).uname_machine == platform.machine()
    accel = run.accel(prepared) if native else "tcg"
    key = _cache_key(run, k, prepared, userland, accel)
    console_dest = run.out_dir / "console" / f"{k.name}.log"
    hit = None if run.opts.force else run.cell_cache.get(key)
    if hit is not None:
        cell, console = hit
        if console is not None:
            console_dest.parent.mkdir(parents=True, exist_ok=True)
            console_dest.write_bytes(console.read_bytes())
        return cell | {"cached": True}
    run.progress.phase(k.name, f"boot {prepared.release or prepared.vmlinuz.name} ({accel})")
    cell = run_qemu_cell(
        prepared,
        userland,
        run.matrix,
        workdir=run.cache / "work" / run.opts.name / k.name,
        console_dest=console_dest,
        accel=accel,
        memory_bytes=k.memory or run.matrix.guest.memory,
        shm_size=k.shm_size or run.matrix.guest.shm_size,
    )
    run.cell_cache.put(key, cell, console_dest)
    return cell | {"cached": False}


def _run_one(
    run: _Run,
    archive: Archive,
    k: KernelConfig,
    resolved: dict[str, KernelPackages],
    userland: Userland,
) -> JSON:
    """One cell; an infrastructure failure becomes the cell's status, not the run's end."""
    try:
        if k.backend == "docker":
            run.progress.phase(k.name, "container on the host kernel")
            console_dest = run.out_dir / "console" / f"{k.name}.log"
            return run_docker_cell(
                k, run.matrix, userland, run.cache, console_dest, run.progress.log
            )
        return _qemu_cell(run, archive, k, resolved.get(k.name), userland)
    except UserError:
        raise
    except KmatrixError as exc:
        cell = new_cell(k.name, k.backend)
        cell.update(status="error", reason=str(exc))
        return cell


def _run_cells(
    run: _Run, archive: Archive, resolved: dict[str, KernelPackages], userland: Userland
) -> None:
    jobs = run.opts.jobs or os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cell")
    try:
        futures = [pool.submit(_run_one, run, archive, k, resolved, userland) for k in run.kernels]
        for future in as_completed(futures):
            run.add(future.result())
    except KeyboardInterrupt:
        killed = qemu.kill_all() + docker_backend.kill_all()
        pool.shutdown(wait=True, cancel_futures=True)
        run.results["run"]["interrupted"] = _now()
        run.save()
        done = len(run.results["cells"])
        raise InfraError(
            f"interrupted: stopped {killed} QEMU process(es) and container(s); {done} finished "
            f"cell(s) saved in {run.out_dir}; run the same command again to resume from the cache"
        ) from None
    finally:
        pool.shutdown(wait=True)


def run_matrix(opts: RunOptions, progress: Progress | None = None) -> JSON:
    """Run the matrix and return the results document (also written to reports/NAME/)."""
    matrix = load_matrix(opts.matrix_path)
    if opts.accel is not None:  # CI runners differ in KVM; the matrix file stays the same
        matrix = matrix.model_copy(update={"accel": opts.accel})
    kernels = matrix.select(list(opts.kernels))
    progress = progress or Progress()
    qemu.allow_start()
    with progress, sigterm_as_interrupt():
        run = _Run(opts, matrix, kernels, progress)
        run.archives = _archives(matrix, kernels, run.cache, progress)
        archive = run.archives["amd64"]
        resolved = _resolve_all(run.archives, kernels, progress)
        run.results["run"]["host"]["qemu"] = qemu.qemu_version()
        userland = build_userland(archive, matrix.guest.suite, run.cache, progress.log)
        run.results["run"]["guest"] = {"suite": matrix.guest.suite, "packages": userland.packages}
        _foreign_userlands(run, progress)
        _run_cells(run, archive, resolved, userland)
        run.results["run"]["finished"] = _now()
        run.save(final=True)
        progress.log(f"wrote {run.out_dir / 'report.md'} and results.json")
        # matrix.yaml's expectations gate a release: ExpectationFailed (exit 1) names each one.
        progress.log(enforce(matrix.expectations, run.results))
    return run.results


def _archives(
    matrix: Matrix, kernels: list[KernelConfig], cache: Path, progress: Progress
) -> dict[str, Archive]:
    """One verified archive client per architecture the run needs (same mirror, same keys)."""
    arches = ["amd64", *sorted({k.arch for k in kernels if k.backend == "qemu"} - {"amd64"})]
    mirror = resolve_mirror(matrix.mirror)
    return {
        arch: Archive(
            mirror,
            cache,
            keyring=matrix.keyring,
            check_valid_until=matrix.check_valid_until,
            arch=arch,
            log=progress.log,
        )
        for arch in arches
    }


def _foreign_userlands(run: _Run, progress: Progress) -> None:
    """The guest userland (same suite and package list) and QEMU of every non-amd64 arch."""
    for arch, archive in run.archives.items():
        if arch == "amd64":
            continue
        binary = qemu.arch_for(arch).binary
        run.results["run"]["host"][f"qemu_{arch}"] = qemu.qemu_version(binary)
        userland = build_userland(archive, run.matrix.guest.suite, run.cache, progress.log)
        run.userlands[arch] = userland
        run.results["run"]["guest"][f"packages_{arch}"] = userland.packages


def summarize(results: JSON) -> tuple[int, str]:
    """Exit code and one-line summary: 0 when every cell is ok, 1 when any is not."""
    cells = results["cells"]
    bad = [f"{c['id']} ({c['status']})" for c in cells if c["status"] not in ("ok", "skipped")]
    cached = sum(1 for c in cells if c.get("cached"))
    note = f", {cached} from cache" if cached else ""
    if bad:
        return 1, f"{len(bad)} of {len(cells)} cells not ok: {', '.join(bad)}{note}"
    return 0, f"{len(cells)} cells done, none failed{note}"
