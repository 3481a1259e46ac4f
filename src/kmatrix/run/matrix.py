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
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from kmatrix import __version__
from kmatrix.backends import docker as docker_backend
from kmatrix.backends import qemu
from kmatrix.cells.docker import run_docker_cell
from kmatrix.cells.qemu import PROVENANCE_KEYS, kernel_info, run_qemu_cell
from kmatrix.config import KernelConfig, Matrix, check_local_paths, load_matrix
from kmatrix.debian.archive import Archive, default_cache_dir
from kmatrix.debian.suites import ResolvedKernel, Resolver
from kmatrix.errors import InfraError, KmatrixError, UserError
from kmatrix.gate.check import enforce
from kmatrix.guest.kernels import PreparedKernel, prepare_debian, prepare_local
from kmatrix.guest.userland import INIT_FILE, Userland, build_userland, probe_sha256
from kmatrix.report.dirs import (
    check_report_name,
    disk_errors,
    previous_cells,
    run_lock,
    usable_cache,
)
from kmatrix.report.markdown import write_report
from kmatrix.results.cache import CellCache, cell_key
from kmatrix.results.contract import Cell, HostInfo, KernelInfo, Results
from kmatrix.results.schema import SCHEMA_VERSION, mark_incomplete, new_cell, write_results
from kmatrix.run.interrupt import sigterm_as_interrupt
from kmatrix.run.progress import Progress

#: Most cells run at once: each is a QEMU guest of up to guest.memory.
MAX_JOBS = 64
# A kernel entry resolved, or why it could not be (an archive down: that cell's error only).
Resolution = ResolvedKernel | InfraError


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


def _host_info() -> HostInfo:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _resolve_all(
    resolver: Resolver, kernels: list[KernelConfig], progress: Progress
) -> dict[str, Resolution]:
    """Resolve every Debian kernel up front: a typo fails before any large download.

    An archive that cannot be reached or verified fails only the cells that need it.
    """
    resolved: dict[str, Resolution] = {}
    for k in kernels:
        if k.backend == "qemu" and k.path is None:
            try:
                res = resolver.resolve(k)
            except UserError as exc:
                raise UserError(f"matrix.yaml kernel {k.name!r}: {exc}") from None
            except InfraError as exc:
                progress.log(f"{k.name}: {k.source} cannot be resolved: {exc}")
                resolved[k.name] = exc
                continue
            stale = res.stale_pin
            note = f"; stale pin: {stale['newest']} in {stale['suite']}" if stale else ""
            progress.log(
                f"{k.name}: {k.source} -> {res.primary.name} {res.primary.version} "
                f"({res.primary.suite}){note}"
            )
            resolved[k.name] = res
    return resolved


class _Run:
    """The state of one matrix run: its results document, where it goes, shared resources."""

    def __init__(
        self, opts: RunOptions, matrix: Matrix, kernels: list[KernelConfig], progress: Progress
    ) -> None:
        self.opts, self.matrix, self.kernels, self.progress = opts, matrix, kernels, progress
        self.out_dir = opts.reports_dir / opts.name
        self.cache = usable_cache(default_cache_dir())
        self.cell_cache = CellCache(self.cache / "cells")
        self.work_root = self.cache / "work" / opts.name
        self.carried: list[Cell] = []
        self.failed = threading.Event()  # set by the first cell kmatrix itself failed in
        self._lock = threading.Lock()
        self._accel: str | None = None
        # Per Debian architecture (amd64 always; arm64 when a kernel asks for it).
        self.archives: dict[str, Archive] = {}
        self.userlands: dict[str, Userland] = {}
        self.results: Results = {
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

        Cells this run has not finished yet keep their previous run's result (flagged
        ``carried_over``), so an interrupted run leaves no fewer results than before.
        Charts take seconds to draw, so they are drawn only once, at the end of the run.
        """
        with self._lock:
            order = {k.name: i for i, k in enumerate(self.kernels)}
            # In place: the results run_matrix returns are in matrix order too.
            self.results["cells"].sort(key=lambda c: order.get(c["id"], len(order)))
            done = {c["id"] for c in self.results["cells"]}
            old = [] if final else [c for c in self.carried if c["id"] not in done]
            doc: Results = self.results | {"cells": [*self.results["cells"], *old]}
            doc["cells"].sort(key=lambda c: order.get(c["id"], len(order)))
            with disk_errors(self.out_dir):
                write_results(self.out_dir / "results.json", doc)
                write_report(doc, self.out_dir, charts=final)

    def add(self, cell: Cell) -> None:
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
            # A local build: bzImage, modules tree and .config; a package: its SHA256.
            "kernel": prepared.provenance.get("build_sha256") or prepared.provenance.get("sha256"),
            "userland": userland.key,
            "probe": run.results["run"]["probe_sha256"],
            "init": hashlib.sha256(INIT_FILE.read_bytes()).hexdigest(),
            # The host turns the consoles into results: a parser change re-measures.
            "parsers": _parsers_digest(),
            # What is measured, not how the run is checked or where packages come from.
            "matrix": run.matrix.model_dump(mode="json", include={"guest", "probe", "oom"}),
            "memory": k.memory,
            "cmdline": k.cmdline,
            "shm_size": k.shm_size,
            "accel": accel,
            "qemu": _qemu_version_of(run.results["run"]["host"], k.arch),
            "arch": k.arch,
            "cpu": qemu.arch_for(k.arch).tcg_cpu if accel == "tcg" else "host",
        }
    )


#: Host-side code that builds a QEMU cell's results from what the guest printed, by path
#: under the kmatrix package.
_PARSERS = (
    "results/oomlog.py",
    "results/oom.py",
    "cells/console.py",
    "results/schema.py",
    "cells/qemu.py",
    "cells/oom_boots.py",
)


def _parsers_digest() -> str:
    h = hashlib.sha256()
    for name in _PARSERS:
        h.update((Path(__file__).parents[1] / name).read_bytes())
    return h.hexdigest()


def _qemu_version_of(host: Mapping[str, Any], arch: str) -> str | None:
    """The recorded version of the QEMU binary that boots ``arch`` guests."""
    return host.get("qemu") if arch == "amd64" else host.get(f"qemu_{arch}")


def _qemu_cell(
    run: _Run, archive: Archive, k: KernelConfig, res: ResolvedKernel | None, userland: Userland
) -> Cell:
    archive = run.archives.get(k.arch, archive)
    userland = run.userlands.get(k.arch, userland)
    if k.path is not None:
        prepared = prepare_local(k)
    else:
        assert res is not None
        run.progress.phase(k.name, f"fetch {res.primary.name}")
        prepared = prepare_debian(archive, k, res, run.cache)
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
        return _refresh_provenance(cell, prepared) | {"cached": True}
    run.progress.phase(k.name, f"boot {prepared.release or prepared.vmlinuz.name} ({accel})")
    # The console is written to the work directory first and copied into the report only
    # once the cell is in the result cache: a full or unwritable reports disk loses nothing.
    console_work = run.work_root / f"{k.name}.console.log"
    cell = run_qemu_cell(
        prepared,
        userland,
        run.matrix,
        workdir=run.work_root / k.name,
        console_dest=console_work,
        accel=accel,
        memory_bytes=k.memory or run.matrix.guest.memory,
        shm_size=k.shm_size or run.matrix.guest.shm_size,
    )
    # Only a complete cell is cached: one with an OOM experiment in error is rerun next time.
    cell = mark_incomplete(cell)
    run.cell_cache.put(key, cell, console_work)
    console_dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(console_work, console_dest)
    return cell | {"cached": False}


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


def _unresolved_cell(k: KernelConfig, exc: InfraError) -> Cell:
    """The cell of a kernel whose archive could not be used: the reason says which and why."""
    cell = new_cell(k.name, k.backend)
    cell |= {"status": "error", "reason": f"kernel {k.source} not resolved: {exc}"}
    cell["kernel"] = {"name": k.name, "requested": k.source}
    cell["arch"] = k.arch
    return cell


def _run_one(
    run: _Run,
    archive: Archive,
    k: KernelConfig,
    resolved: dict[str, Resolution],
    userland: Userland,
) -> Cell | None:
    """One cell. What the guest does is its status; kmatrix failing is a :class:`_CellError`.

    An archive that could not be used is that cell's error only. None: the cell did not
    start because another cell had already failed.
    """
    if run.failed.is_set():
        return None
    res = resolved.get(k.name)
    if isinstance(res, InfraError):
        return _unresolved_cell(k, res)
    try:
        with disk_errors(run.out_dir):
            if k.backend == "docker":
                run.progress.phase(k.name, "container on the host kernel")
                console_dest = run.out_dir / "console" / f"{k.name}.log"
                cell = run_docker_cell(
                    k, run.matrix, userland, run.cache, console_dest, run.progress.log
                )
            else:
                cell = _qemu_cell(run, archive, k, res, userland)
        return mark_incomplete(cell)
    except KmatrixError as exc:
        run.failed.set()  # a worker picking up the next cell must not start it
        cell = new_cell(k.name, k.backend)
        cell |= {"status": "error", "reason": str(exc)}
        raise _CellError(cell, exc) from None


def _run_cells(
    run: _Run, archive: Archive, resolved: dict[str, Resolution], userland: Userland
) -> None:
    jobs = run.opts.jobs or os.cpu_count() or 1
    # A cell alone (a CI job runs one) still boots its OOM lanes side by side on every core.
    qemu.set_parallel(max(jobs, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cell")
    try:
        futures = [pool.submit(_run_one, run, archive, k, resolved, userland) for k in run.kernels]
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
        # Whatever ended the loop (a cell's error, a full disk), queued cells do not start.
        pool.shutdown(wait=True, cancel_futures=True)


def _raise_cell_error(run: _Run, failed: _CellError, cancelled: int) -> None:
    """End the run with the cell's error (exit 2), saying what was kept and what was not run."""
    run.results["run"]["aborted"] = _now()
    run.save()
    done = sum(c["id"] != failed.cell["id"] for c in run.results["cells"])
    msg = (
        f"cell {failed.cell['id']}: {failed.error}; {cancelled} queued cell(s) cancelled, "
        f"{done} other finished cell(s) saved in {run.out_dir}"
    )
    cls = UserError if isinstance(failed.error, UserError) else InfraError
    raise cls(msg) from None


def run_matrix(opts: RunOptions, progress: Progress | None = None) -> Results:
    """Run the matrix and return the results document (also written to reports/NAME/)."""
    check_report_name(opts.name)
    if not 0 <= opts.jobs <= MAX_JOBS:
        raise UserError(f"--jobs {opts.jobs}: use 1 to {MAX_JOBS} (0: one per CPU core)")
    matrix = load_matrix(opts.matrix_path)
    if opts.accel is not None:  # CI runners differ in KVM; the matrix file stays the same
        matrix = matrix.model_copy(update={"accel": opts.accel})
    kernels = matrix.select(list(opts.kernels), str(opts.matrix_path))
    check_local_paths(kernels, str(opts.matrix_path))
    progress = progress or Progress()
    qemu.allow_start()
    with progress, sigterm_as_interrupt():
        run = _Run(opts, matrix, kernels, progress)
        with run_lock(run.out_dir, run.work_root):
            run.carried = previous_cells(run.out_dir, [k.name for k in kernels])
            _run_locked(run, progress)
    return run.results


def _run_locked(run: _Run, progress: Progress) -> None:
    """Everything of a run that needs its report and work directory to itself."""
    matrix, kernels = run.matrix, run.kernels
    resolver = Resolver(matrix, run.cache, progress.log)
    run.archives = _archives(resolver, kernels)
    archive = run.archives["amd64"]
    resolved = _resolve_all(resolver, kernels, progress)
    run.results["run"]["host"]["qemu"] = qemu.qemu_version()
    userland = build_userland(archive, matrix.guest.suite, run.cache, progress.log)
    run.results["run"]["guest"] = {"suite": matrix.guest.suite, "packages": userland.packages}
    _foreign_userlands(run, progress)
    _run_cells(run, archive, resolved, userland)
    run.results["run"]["finished"] = _now()
    run.save(final=True)
    progress.log(f"wrote {run.out_dir / 'report.md'} and results.json")
    # matrix.yaml's expectations gate a release: ExpectationFailed (exit 1) names each one.
    progress.log(enforce(matrix.expectations, run.results, ran=[k.name for k in kernels]))


def _archives(resolver: Resolver, kernels: list[KernelConfig]) -> dict[str, Archive]:
    """Debian's main archive for each architecture the run needs (the guest userlands)."""
    arches = ["amd64", *sorted({k.arch for k in kernels if k.backend == "qemu"} - {"amd64"})]
    return {arch: resolver.main_archive(arch) for arch in arches}


def _foreign_userlands(run: _Run, progress: Progress) -> None:
    """The guest userland (same suite and package list) and QEMU of every non-amd64 arch."""
    for arch, archive in run.archives.items():
        if arch == "amd64":
            continue
        if arch != "arm64":  # backends.qemu.ARCHES: amd64 and arm64; HostInfo, GuestInfo too
            raise AssertionError(f"results.contract has no qemu_{arch} / packages_{arch} keys")
        binary = qemu.arch_for(arch).binary
        run.results["run"]["host"]["qemu_arm64"] = qemu.qemu_version(binary)
        userland = build_userland(archive, run.matrix.guest.suite, run.cache, progress.log)
        run.userlands[arch] = userland
        run.results["run"]["guest"]["packages_arm64"] = userland.packages


def summarize(results: Results) -> tuple[int, str]:
    """Exit code and one-line summary: 0 when every cell is ok, 1 when any is not."""
    cells = results["cells"]
    bad = [f"{c['id']} ({c['status']})" for c in cells if c["status"] not in ("ok", "skipped")]
    cached = sum(1 for c in cells if c.get("cached"))
    note = f", {cached} from cache" if cached else ""
    if bad:
        return 1, f"{len(bad)} of {len(cells)} cells not ok: {', '.join(bad)}{note}"
    return 0, f"{len(cells)} cells done, none failed{note}"
