"""`invoke matrix --runtime docker`: every QEMU cell in the runner image, then one report.

Each QEMU cell runs as `invoke cell` in its own runner container (the same image, QEMU and
Python on every host, :func:`kmatrix.run.in_docker.run_cell_in_docker`), cells that cannot run there
(``backend: docker`` cells, local builds) run on the host as `invoke cell` would, and the
partial results are merged into ``reports/NAME/`` exactly like the CI fan-out's merge job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kmatrix.backends import docker as engine
from kmatrix.config import DebianKernel, Kernel, load_matrix
from kmatrix.debian.archive import default_cache_dir, resolve_mirror
from kmatrix.errors import ExpectationFailed, InfraError
from kmatrix.report.markdown import REPORTS
from kmatrix.results.contract import Results
from kmatrix.results.schema import load_results
from kmatrix.run.ci import run_cell
from kmatrix.run.in_docker import run_cell_in_docker, stop_runners
from kmatrix.run.merge import merge_files
from kmatrix.run.runner_image import ensure_runner_image, require_checkout

Where = Literal["runner", "host"]


@dataclass(frozen=True)
class PlannedCell:
    """One cell of the run and where it runs."""

    kernel: str
    where: Where
    output: Path  # its one-cell results.json


def plan_cells(kernels: Sequence[Kernel], parts_dir: Path) -> list[PlannedCell]:
    """Where each cell runs (pure): QEMU cells of Debian kernels in the runner, the rest here.

    A docker cell is already a container on the host's engine, and a local build's files are
    not mounted into the runner, so those two run on the host.
    """
    return [
        PlannedCell(
            k.name,
            "runner" if isinstance(k, DebianKernel) else "host",
            parts_dir / f"{k.name}.json",
        )
        for k in kernels
    ]


def _run_one(
    cell: PlannedCell, matrix_path: Path, force: bool, reports_dir: Path, runners: int
) -> int:
    """Run one planned cell; its exit code (results land in ``cell.output``)."""
    if cell.where == "runner":
        return run_cell_in_docker(
            matrix_path, cell.kernel, cell.output, force=force, reports_dir=reports_dir,
            runners=runners,
        )  # fmt: skip
    try:
        run_cell(matrix_path, cell.kernel, cell.output, force=force, reports_dir=reports_dir)
    except ExpectationFailed:
        return 1  # the whole run's check below names it
    return 0


def _run_all(
    plan: Sequence[PlannedCell], matrix_path: Path, force: bool, reports_dir: Path, jobs: int
) -> list[int]:
    """Every planned cell, ``jobs`` at a time; their exit codes in plan order.

    Not a ``with`` block: on Ctrl-C its exit would wait for the workers, which wait on their
    containers; the containers are removed first, which ends the workers' waits.
    """
    pool = ThreadPoolExecutor(max_workers=jobs)
    runners = min(jobs, sum(c.where == "runner" for c in plan))
    try:
        futures = [pool.submit(_run_one, c, matrix_path, force, reports_dir, runners) for c in plan]
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        stop_runners()  # the workers' containers: the signal reached only this thread
        engine.kill_all()  # and the host-side docker cells' containers
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_matrix_in_docker(
    matrix_path: Path,
    name: str,
    kernels: Sequence[str] = (),
    *,
    jobs: int = 0,
    force: bool = False,
    reports_dir: Path = REPORTS,
    log: Callable[[str], None] = print,
) -> Results:
    """Run the matrix with its QEMU cells in runner containers; the merged results document.

    The image is built (or found) once before the cells start, so parallel cells never build
    it twice. Ctrl-C kills every runner container before it propagates. Each cell checks the
    expectations on its own result (`invoke cell`); the merged document is the caller's to
    check (kmatrix.gate.check.gate_run), as after `invoke matrix` on the host.
    """
    matrix = load_matrix(matrix_path)
    selected = matrix.select(list(kernels))
    require_checkout()
    parts_dir = reports_dir / name / "cells"
    parts_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_cells(selected, parts_dir)
    if any(c.where == "runner" for c in plan):
        ensure_runner_image(engine.connect(), resolve_mirror(matrix.mirror), default_cache_dir())
    for stale in plan:
        stale.output.unlink(missing_ok=True)  # a cell that writes nothing must not look done
    codes = _run_all(plan, matrix_path, force, reports_dir, jobs or os.cpu_count() or 1)
    done = [c.output for c in plan if c.output.is_file()]
    missing = [
        f"{c.kernel} (exit {code})"
        for c, code in zip(plan, codes, strict=True)
        if not c.output.is_file()
    ]
    if not done:
        raise InfraError(f"no cell wrote results: {', '.join(missing)}")
    report = merge_files(done, name, matrix_path, reports_dir)
    log(f"wrote {report} and results.json")
    if missing:
        raise InfraError(f"cells without results (see their logs above): {', '.join(missing)}")
    return load_results(report.parent / "results.json")
