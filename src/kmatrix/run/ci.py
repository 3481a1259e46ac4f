"""Fan the matrix out over CI jobs: list its cells, and run exactly one of them.

`invoke ci-matrix` prints the cells as a GitHub Actions ``strategy.matrix``; each job runs
`invoke cell`, which goes through the normal runner (same cache, same checks) and writes a
one-cell results.json; `invoke merge` (kmatrix.run.merge) puts the pieces back together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, cast

from kmatrix.config import load_matrix
from kmatrix.errors import ExpectationFailed, UserError
from kmatrix.report.markdown import REPORTS
from kmatrix.results.contract import Results
from kmatrix.results.schema import JSON, load_results, write_results
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.progress import Progress

ACCELS = ("tcg", "kvm", "auto")


def ci_matrix(matrix_path: Path) -> str:
    """One line of JSON, ``{"include": [{"kernel", "backend"[, "arch"]}, ...]}``, every cell."""
    matrix = load_matrix(matrix_path)
    include: list[JSON] = []
    for k in matrix.kernels:
        entry: JSON = {"kernel": k.name, "backend": k.backend}
        # `arch` arrives with arm64 support; a matrix without it lists no arch at all.
        arch = getattr(k, "arch", None)
        if arch is not None:
            entry["arch"] = arch
        include.append(entry)
    return json.dumps({"include": include}, separators=(",", ":"))


def cell_report_dir(kernel: str, reports_dir: Path = REPORTS) -> Path:
    """Where `invoke cell` leaves the cell's own report and console log: reports/cell-NAME/."""
    return reports_dir / f"cell-{kernel}"


def _accel(accel: str) -> Literal["tcg", "kvm", "auto"] | None:
    if not accel:
        return None
    if accel not in ACCELS:
        raise UserError(f"--accel {accel!r}: use one of {', '.join(ACCELS)} (or leave it out)")
    return cast(Literal["tcg", "kvm", "auto"], accel)


def run_cell(
    matrix_path: Path,
    kernel: str,
    output: Path,
    *,
    force: bool = False,
    accel: str = "",
    reports_dir: Path = REPORTS,
    progress: Progress | None = None,
) -> Results:
    """Run one cell through the normal runner and write its one-cell results.json to ``output``.

    The runner's own report goes to ``cell_report_dir(kernel)``. When the cell ran but one of
    the matrix's expectations failed, ``output`` is still written before the error is raised:
    the merge job must see what was measured.
    """
    opts = RunOptions(
        matrix_path=matrix_path,
        name=cell_report_dir(kernel, reports_dir).name,
        kernels=(kernel,),
        reports_dir=reports_dir,
        jobs=1,
        force=force,
        accel=_accel(accel),
    )
    try:
        results = run_matrix(opts, progress)
    except ExpectationFailed:
        # run_matrix saved the finished run before checking expectations.
        write_results(output, load_results(reports_dir / opts.name / "results.json"))
        raise
    write_results(output, results)
    return results
