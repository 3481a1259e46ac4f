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
from kmatrix.errors import UserError
from kmatrix.gate.check import gate_run
from kmatrix.report.markdown import REPORTS
from kmatrix.results.contract import Results
from kmatrix.results.schema import JSON, write_results
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.progress import Progress

ACCELS = ("tcg", "kvm", "auto")


def ci_matrix(matrix_path: Path) -> str:
    """One line of JSON, ``{"include": [{"kernel", "backend"[, "arch"]}, ...]}``, every cell."""
    matrix = load_matrix(matrix_path)
    include: list[JSON] = []
    for k in matrix.kernels:
        include.append({"kernel": k.name, "backend": k.backend, "arch": k.arch})
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
    """`invoke cell`: run one cell through the normal runner, write its one-cell results.json
    to ``output``, then check the matrix's expectations on it.

    The runner's own report goes to ``cell_report_dir(kernel)``. ``output`` is written before
    the expectations are checked, so when one fails (ExpectationFailed, exit 1) the merge job
    still sees what was measured.
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
    progress = progress or Progress()
    results = run_matrix(opts, progress)
    write_results(output, results)
    progress.log(gate_run(results, matrix_path, opts.kernels))
    return results
