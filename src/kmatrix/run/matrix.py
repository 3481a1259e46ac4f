"""`invoke matrix`: resolve every kernel, build the guest, run the cells, write results and report.

Order matters for the user: everything that can be wrong with matrix.yaml (unknown package,
bad pin) is found before any kernel is downloaded; cells run in parallel (``--jobs``,
kmatrix.run.pool); results are written after every cell so an interrupted run loses nothing
it measured, and the result cache lets the next run pick up where this one stopped.

A run measures and writes; it does not judge. The matrix's expectations are checked on the
results it returns by the caller (kmatrix.tasks, kmatrix.run.ci) through kmatrix.gate.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kmatrix.backends import qemu
from kmatrix.config import (
    DebianKernel,
    DockerKernel,
    Kernel,
    LocalKernel,
    check_local_paths,
    load_matrix,
)
from kmatrix.debian.archive import Archive
from kmatrix.debian.suites import Resolver
from kmatrix.errors import InfraError, UserError
from kmatrix.guest.kernels import DebianSource, LocalSource
from kmatrix.guest.userland import build_userland
from kmatrix.report.dirs import check_report_name, previous_cells, run_lock
from kmatrix.results.contract import Results
from kmatrix.run.interrupt import sigterm_as_interrupt
from kmatrix.run.pool import Source, run_cells
from kmatrix.run.progress import Progress
from kmatrix.run.session import MatrixRun, RunOptions, now

__all__ = ["MAX_JOBS", "RunOptions", "kernel_sources", "run_matrix", "summarize"]

#: Most cells run at once: each is a QEMU guest of up to guest.memory.
MAX_JOBS = 64


def run_matrix(opts: RunOptions, progress: Progress | None = None) -> Results:
    """Run the matrix and return the results document (also written to reports/NAME/).

    The expectations are not checked here: see kmatrix.gate.check.gate_run.
    """
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
        run = MatrixRun(opts, matrix, kernels, progress)
        with run_lock(run.out_dir, run.work_root):
            run.carried = previous_cells(run.out_dir, [k.name for k in kernels], progress.log)
            _run_locked(run, progress)
    return run.results


def _run_locked(run: MatrixRun, progress: Progress) -> None:
    """Everything of a run that needs its report and work directory to itself."""
    matrix = run.matrix
    resolver = Resolver(matrix, run.cache, progress.log)
    run.archives = _archives(resolver, run.kernels)
    archive = run.archives["amd64"]
    sources = kernel_sources(run.kernels, resolver, run.cache, progress.log)
    run.results["run"]["host"]["qemu"] = qemu.qemu_version()
    userland = build_userland(archive, matrix.guest.suite, run.cache, progress.log)
    run.results["run"]["guest"] = {"suite": matrix.guest.suite, "packages": userland.packages}
    _foreign_userlands(run, progress)
    run_cells(run, sources, userland)
    run.results["run"]["finished"] = now()
    run.save(final=True)
    progress.log(f"wrote {run.out_dir / 'report.md'} and results.json")


def kernel_sources(
    kernels: list[Kernel], resolver: Resolver, cache: Path, log: Callable[[str], None]
) -> dict[str, Source]:
    """Every QEMU kernel's source. Debian kernels are resolved now, before any large
    download, so a typo fails first; an archive that cannot be reached or verified fails
    only the cells that need it (their source is the error)."""
    sources: dict[str, Source] = {}
    for k in kernels:
        if isinstance(k, LocalKernel):
            sources[k.name] = LocalSource(k)
        elif isinstance(k, DebianKernel):
            sources[k.name] = _resolve(resolver, k, cache, log)
    return sources


def _resolve(
    resolver: Resolver, k: DebianKernel, cache: Path, log: Callable[[str], None]
) -> Source:
    try:
        res = resolver.resolve(k)
    except UserError as exc:
        raise UserError(f"matrix.yaml kernel {k.name!r}: {exc}") from None
    except InfraError as exc:
        log(f"{k.name}: {k.source} cannot be resolved: {exc}")
        return exc
    stale = res.stale_pin
    note = f"; stale pin: {stale['newest']} in {stale['suite']}" if stale else ""
    primary = res.primary
    log(f"{k.name}: {k.source} -> {primary.name} {primary.version} ({primary.suite}){note}")
    # Debian's main archive of the kernel's architecture; each package is fetched from
    # the archive whose signed index listed it.
    return DebianSource(k, res, resolver.main_archive(k.arch), cache)


def _archives(resolver: Resolver, kernels: list[Kernel]) -> dict[str, Archive]:
    """Debian's main archive for each architecture the run needs (the guest userlands)."""
    qemu_arches = {k.arch for k in kernels if not isinstance(k, DockerKernel)}
    arches = ["amd64", *sorted(qemu_arches - {"amd64"})]
    return {arch: resolver.main_archive(arch) for arch in arches}


def _foreign_userlands(run: MatrixRun, progress: Progress) -> None:
    """The guest userland (same suite and package list) and QEMU of every non-amd64 arch."""
    for arch, archive in run.archives.items():
        if arch == "amd64":
            continue
        binary = qemu.arch_for(arch).binary
        if arch != "arm64":  # backends.qemu.ARCHES: amd64 and arm64; HostInfo, GuestInfo too
            raise AssertionError(f"results.contract has no qemu_{arch} / packages_{arch} keys")
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
