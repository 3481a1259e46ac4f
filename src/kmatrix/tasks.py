"""The tasks of ``invoke`` in a checkout and of the installed ``kmatrix`` command.

Thin wrappers that parse options, call kmatrix, and map errors to exit codes. tasks.py at the
repository root only imports :data:`ns`; :mod:`kmatrix.cli` runs it as the ``kmatrix`` program.
`invoke matrix` runs the matrix (kmatrix.run), then gates on what it returned (kmatrix.gate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from kmatrix.errors import KmatrixError
from kmatrix.gate.check import check_file, gate_run
from kmatrix.guest.probe_image import build_images
from kmatrix.report.diff import diff_files
from kmatrix.report.markdown import report_from_file
from kmatrix.results.contract import Results
from kmatrix.run.bench import run_bench
from kmatrix.run.ci import cell_report_dir, ci_matrix, run_cell
from kmatrix.run.in_docker import check_runtime, run_cell_in_docker
from kmatrix.run.matrix import RunOptions, run_matrix, summarize
from kmatrix.run.matrix_in_docker import run_matrix_in_docker
from kmatrix.run.merge import merge_files
from kmatrix.run.progress import Progress
from kmatrix.run.runner_image import build_runner_image


@contextmanager
def kmatrix_errors() -> Iterator[None]:
    """Turn a kmatrix error into invoke's Exit: its message, exit code 1 or 2.

    A file-system error the library did not name (it should) still ends in one line, exit 2.
    """
    try:
        yield
    except KmatrixError as exc:
        raise Exit(f"kmatrix: {exc}", code=exc.exit_code) from None
    except OSError as exc:
        raise Exit(f"kmatrix: {exc.filename or 'a file'}: {exc.strerror or exc}", code=2) from None


def _finish(results: Results, note: str = "") -> None:
    """Print the run's one-line summary (and ``note``); exit 1 unless every cell is ok."""
    code, summary = summarize(results)
    print(summary + note)
    if code:
        raise Exit(code=code)


@task(
    help={
        "name": "report directory under reports/ (default: latest)",
        "kernels": "comma-separated cell names to run (default: all)",
        "matrix-file": "the matrix to run (default: matrix.yaml)",
        "jobs": "QEMU cells run in parallel (default: one per CPU core; Docker cells run beside)",
        "force": "rerun cells even when the result cache has them",
        "runtime": "host (default), or docker: every QEMU cell inside the runner image",
    }
)
def matrix(
    c: Context,
    name: str = "latest",
    kernels: str = "",
    matrix_file: str = "matrix.yaml",
    jobs: int = 0,
    force: bool = False,
    runtime: str = "host",
) -> None:
    """Boot every kernel in matrix.yaml, run the probe, write reports/NAME/."""
    path, selected = Path(matrix_file).resolve(), tuple(k for k in kernels.split(",") if k)
    opts = RunOptions(matrix_path=path, name=name, kernels=selected, jobs=jobs, force=force)
    with kmatrix_errors():
        log: Callable[[str], None] = print
        if check_runtime(runtime) == "docker":
            results = run_matrix_in_docker(path, name, selected, jobs=jobs, force=force)
        else:
            progress = Progress()
            results, log = run_matrix(opts, progress), progress.log
        # matrix.yaml's expectations gate a release: ExpectationFailed (exit 1) names each one.
        log(gate_run(results, path, selected))
    _finish(results)


@task(
    help={
        "matrix-file": "the matrix whose guest userland (and mirror) the images are built from",
        "runner": "build the runner image (QEMU + kmatrix, for --runtime docker) instead",
        "base": "runner base: auto (local or pulled debian:bookworm-slim, else debootstrap), "
        "pull or debootstrap",
    }
)
def images(
    c: Context, matrix_file: str = "matrix.yaml", runner: bool = False, base: str = "auto"
) -> None:
    """Build the probe image (FROM scratch), or the runner image, unless its content tag exists."""
    path = Path(matrix_file).resolve()
    with kmatrix_errors():
        image = build_runner_image(path, base) if runner else build_images(path)
    print(f"{image.tag} ({'built' if image.built else 'up to date'})")


@task(
    help={
        "results": "the results.json to render",
        "name": "write to reports/NAME/ instead of next to the results file",
    }
)
def report(c: Context, results: str, name: str = "") -> None:
    """Re-render report.md and its charts from a results file, without running anything."""
    with kmatrix_errors():
        path = report_from_file(Path(results), name)
    print(f"wrote {path}")


@task(
    help={
        "results": "the results.json to check",
        "junit": "also write JUnit XML here (one testcase per expectation and cell)",
        "matrix-file": "the matrix whose expectations apply (default: matrix.yaml)",
        "fail-on-stale": "also fail (exit 1) when a cell ran a pinned version its suites outdate",
    }
)
def check(
    c: Context,
    results: str,
    junit: str = "",
    matrix_file: str = "matrix.yaml",
    fail_on_stale: bool = False,
) -> None:
    """Evaluate matrix.yaml's expectations: exit 0 all hold, 1 one failed, 2 cannot run."""
    with kmatrix_errors():
        summary = check_file(
            Path(results), Path(matrix_file), Path(junit) if junit else None, fail_on_stale
        )
    print(summary)


@task(
    help={
        "base": "the older results.json",
        "new": "the newer results.json",
        "threshold": "noise threshold, e.g. '1MiB,5%' (default; oom_score: '5pt')",
    }
)
def diff(c: Context, base: str, new: str, threshold: str = "") -> None:
    """Print, as markdown for a pull request, what changed between two results files."""
    with kmatrix_errors():
        print(diff_files(Path(base), Path(new), threshold), end="")


@task(
    help={
        "matrix-file": "the matrix to measure (default: matrix.yaml)",
        "repeats": "warm and cached runs to take medians over (default: 3)",
        "cold": "also run once with an empty cache, downloading everything (default: on)",
    }
)
def bench(
    c: Context, matrix_file: str = "matrix.yaml", repeats: int = 3, cold: bool = True
) -> None:
    """Measure download, build, boot and whole-matrix times and peak memory; print a table."""
    with kmatrix_errors():
        print(run_bench(Path(matrix_file).resolve(), repeats=repeats, cold=cold))


@task(
    name="ci-matrix",
    help={"matrix-file": "the matrix whose cells to list (default: matrix.yaml)"},
)
def ci_matrix_task(c: Context, matrix_file: str = "matrix.yaml") -> None:
    """Print every cell of the matrix as one line of JSON for a GitHub Actions strategy.matrix."""
    with kmatrix_errors():
        print(ci_matrix(Path(matrix_file).resolve()))


@task(
    help={
        "kernel": "the one cell (kernel name in the matrix) to run",
        "output": "where to write the one-cell results.json",
        "matrix-file": "the matrix the cell is in (default: matrix.yaml)",
        "force": "rerun the cell even when the result cache has it",
        "accel": "override the matrix's accel: tcg, kvm or auto (KVM after a smoke boot)",
        "runtime": "host (default), or docker: run the cell inside the runner image",
    }
)
def cell(
    c: Context,
    kernel: str,
    output: str,
    matrix_file: str = "matrix.yaml",
    force: bool = False,
    accel: str = "",
    runtime: str = "host",
) -> None:
    """Run one cell (report in reports/cell-KERNEL/) and write its partial results to OUTPUT."""
    with kmatrix_errors():
        if check_runtime(runtime) == "docker":
            code = run_cell_in_docker(
                Path(matrix_file).resolve(), kernel, Path(output), force=force, accel=accel
            )
            raise Exit(code=code)
        results = run_cell(
            Path(matrix_file).resolve(), kernel, Path(output), force=force, accel=accel
        )
    _finish(results, f"; wrote {output} (report: {cell_report_dir(kernel)})")


@task(
    help={
        "files": "comma-separated partial results files, e.g. a.json,b.json",
        "name": "write the merged results and report to reports/NAME/",
        "matrix-file": "order cells as in this matrix (default: matrix.yaml; '' keeps input order)",
    }
)
def merge(c: Context, files: str, name: str, matrix_file: str = "matrix.yaml") -> None:
    """Merge partial results (one per cell) into reports/NAME/results.json and report.md."""
    paths = [Path(f) for f in files.split(",") if f]
    with kmatrix_errors():
        path = merge_files(paths, name, Path(matrix_file) if matrix_file else None)
    print(f"wrote {path}")


#: Every task, under the names ``invoke --list`` and ``kmatrix --list`` show.
ns = Collection(matrix, images, report, check, diff, bench, ci_matrix_task, cell, merge)
