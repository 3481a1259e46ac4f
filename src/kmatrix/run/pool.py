"""The cells of a run, side by side in a thread pool: each one planned, run (or taken from
the result cache) and saved as soon as it is done.

What the guest does is a cell's status; kmatrix itself failing in a cell (QEMU cannot start,
the disk is full) cancels the queued cells and ends the run with that error.
"""

from __future__ import annotations

import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import cast

from kmatrix.backends import docker as docker_backend
from kmatrix.backends import qemu
from kmatrix.cells.docker import run_docker_cell
from kmatrix.cells.qemu import PROVENANCE_KEYS, kernel_info, run_qemu_cell
from kmatrix.config import DockerKernel, Kernel, QemuKernel
from kmatrix.errors import InfraError, KmatrixError, UserError
from kmatrix.guest.kernels import KernelSource, PreparedKernel
from kmatrix.guest.userland import Userland
from kmatrix.report.dirs import disk_errors
from kmatrix.results.contract import Cell, KernelInfo
from kmatrix.results.schema import mark_incomplete, new_cell
from kmatrix.run.plan import cache_key, docker_plan, qemu_plan, qemu_version_of
from kmatrix.run.session import MatrixRun, now

#: A QEMU kernel ready to be prepared, or why its archive could not be used (that cell's
#: error only).
Source = KernelSource | InfraError


def _qemu_cell(run: MatrixRun, k: QemuKernel, source: KernelSource, userland: Userland) -> Cell:
    userland = run.userlands.get(k.arch, userland)
    if phase := source.phase():
        run.progress.phase(k.name, phase)
    prepared = source.prepare()
    # KVM runs only guests of the host's own architecture: anything else is TCG.
    native = qemu.arch_for(k.arch).uname_machine == platform.machine()
    plan = qemu_plan(run.matrix, k, run.accel(prepared) if native else "tcg")
    host = run.results["run"]["host"]
    key = cache_key(
        plan, prepared, userland, run.results["run"]["probe_sha256"], qemu_version_of(host, k.arch)
    )
    console_dest = run.out_dir / "console" / f"{k.name}.log"
    hit = None if run.opts.force else run.cell_cache.get(key)
    if hit is not None:
        cell, console = hit
        if console is not None:
            console_dest.parent.mkdir(parents=True, exist_ok=True)
            console_dest.write_bytes(console.read_bytes())
        return _refresh_provenance(cell, prepared) | {"cached": True}
    boot = prepared.release or prepared.vmlinuz.name
    run.progress.phase(k.name, f"boot {boot} ({plan.accel})")
    # The console is written to the work directory first and copied into the report only
    # once the cell is in the result cache: a full or unwritable reports disk loses nothing.
    console_work = run.work_root / f"{k.name}.console.log"
    cell = run_qemu_cell(prepared, userland, plan, run.work_root / k.name, console_work)
    # Only a complete cell is cached: one with an OOM experiment in error is rerun next time.
    cell = mark_incomplete(cell)
    run.cell_cache.put(key, cell, console_work)
    console_dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(console_work, console_dest)
    return cell | {"cached": False}


def _docker_cell(run: MatrixRun, k: DockerKernel, userland: Userland) -> Cell:
    run.progress.phase(k.name, "container on the host kernel")
    console_dest = run.out_dir / "console" / f"{k.name}.log"
    plan = docker_plan(run.matrix, k)
    return run_docker_cell(plan, userland, run.cache, console_dest, run.progress.log)


class _CellError(Exception):
    """kmatrix itself failed in a cell: the cell (status error) and the error."""

    def __init__(self, cell: Cell, error: KmatrixError) -> None:
        super().__init__(str(error))
        self.cell, self.error = cell, error


def _refresh_provenance(cell: Cell, prepared: PreparedKernel) -> Cell:
    """A cached cell with today's provenance: same kernel, but e.g. a pin may have gone stale."""
    current = kernel_info(prepared)
    kernel = {k: v for k, v in (cell.get("kernel") or {}).items() if k not in PROVENANCE_KEYS}
    fresh = {k: v for k, v in current.items() if k in PROVENANCE_KEYS}
    return cell | {"kernel": cast(KernelInfo, kernel | fresh)}  # KernelInfo's keys, by name


def unresolved_cell(k: Kernel, exc: InfraError) -> Cell:
    """The cell of a kernel whose archive could not be used: the reason says which and why."""
    cell = new_cell(k.name, k.backend)
    cell |= {"status": "error", "reason": f"kernel {k.source} not resolved: {exc}"}
    cell["kernel"] = {"name": k.name, "requested": k.source}
    cell["arch"] = k.arch
    return cell


def _run_one(
    run: MatrixRun, k: Kernel, sources: dict[str, Source], userland: Userland
) -> Cell | None:
    """One cell. What the guest does is its status; kmatrix failing is a :class:`_CellError`.

    An archive that could not be used is that cell's error only. None: the cell did not
    start because another cell had already failed.
    """
    if run.failed.is_set():
        return None
    source = sources.get(k.name)
    if isinstance(source, InfraError):
        return unresolved_cell(k, source)
    try:
        with disk_errors(run.out_dir):
            if isinstance(k, DockerKernel):
                cell = _docker_cell(run, k, userland)
            else:
                assert source is not None  # every QEMU kernel has one (kmatrix.run.matrix)
                cell = _qemu_cell(run, k, source, userland)
        return mark_incomplete(cell)
    except KmatrixError as exc:
        run.failed.set()  # a worker picking up the next cell must not start it
        cell = new_cell(k.name, k.backend)
        cell |= {"status": "error", "reason": str(exc)}
        raise _CellError(cell, exc) from None


def start_order(kernels: list[Kernel]) -> list[Kernel]:
    """Cells in the order they start: foreign-architecture guests first (TCG runs an arm64
    guest about 1.5x slower than an amd64 one), so the longest cell does not run alone at
    the end; then matrix order. Results keep matrix order (MatrixRun.save). (Docker cells
    start at once whatever their place: they have a worker of their own, see run_cells.)"""
    native = platform.machine()
    return sorted(kernels, key=lambda k: qemu.arch_for(k.arch).uname_machine == native)


def run_cells(run: MatrixRun, sources: dict[str, Source], userland: Userland) -> None:
    """Every cell of the run, each saved as soon as it is done: the QEMU cells ``--jobs`` at
    a time, the Docker cells one at a time beside them from the start (they take no QEMU
    slot; queued behind the QEMU cells, one would run alone at the end)."""
    jobs = run.opts.jobs or os.cpu_count() or 1
    # A cell alone (a CI job runs one) still boots its OOM lanes side by side on every core.
    qemu.set_parallel(max(jobs, qemu.default_slots()))
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cell")
    docker_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docker-cell")
    pools = (pool, docker_pool)
    try:
        futures = [
            (docker_pool if k.backend == "docker" else pool).submit(
                _run_one, run, k, sources, userland
            )
            for k in start_order(run.kernels)
        ]
        failed: _CellError | None = None
        cancelled = 0
        for future in as_completed(futures):
            if future.cancelled():
                continue
            try:
                cell = future.result()
                if cell is None:
                    cancelled += 1
                    continue
                run.add(cell)
            except _CellError as exc:
                run.add(exc.cell)
                if failed is None:
                    # The first failure cancels the queued cells; running ones finish and count.
                    failed = exc
                    cancelled += sum(f.cancel() for f in futures)
        if failed is not None:
            _raise_cell_error(run, failed, cancelled)
    except KeyboardInterrupt:
        run.failed.set()  # a worker between two cells must not start the next one
        killed = qemu.kill_all() + docker_backend.kill_all()
        _shutdown(pools)
        run.results["run"]["interrupted"] = now()
        run.save()
        done = len(run.results["cells"])
        raise InfraError(
            f"interrupted: stopped {killed} QEMU process(es) and container(s); {done} finished "
            f"cell(s) saved in {run.out_dir}; run the same command again to resume from the cache"
        ) from None
    finally:
        # Whatever ended the loop (a cell's error, a full disk), queued cells do not start.
        _shutdown(pools)


def _shutdown(pools: tuple[ThreadPoolExecutor, ...]) -> None:
    """Cancel every queued cell in every pool, then wait for the running ones (idempotent).
    All queues first: waiting for one pool's running cells would let the other pool start
    its next cell meanwhile."""
    for each in pools:
        each.shutdown(wait=False, cancel_futures=True)
    for each in pools:
        each.shutdown(wait=True)


def _raise_cell_error(run: MatrixRun, failed: _CellError, cancelled: int) -> None:
    """End the run with the cell's error (exit 2), saying what was kept and what was not run."""
    run.results["run"]["aborted"] = now()
    run.save()
    done = sum(c["id"] != failed.cell["id"] for c in run.results["cells"])
    msg = (
        f"cell {failed.cell['id']}: {failed.error}; {cancelled} queued cell(s) cancelled, "
        f"{done} other finished cell(s) saved in {run.out_dir}"
    )
    cls = UserError if isinstance(failed.error, UserError) else InfraError
    raise cls(msg) from None
