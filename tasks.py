"""invoke tasks: thin wrappers that parse options, call kmatrix, and map errors to exit codes."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import Context, Exit, task

sys.path.insert(0, str(Path(__file__).parent / "src"))

from kmatrix.errors import KmatrixError  # noqa: E402
from kmatrix.runner import RunOptions, run_matrix, summarize  # noqa: E402


@task(help={"name": "report directory under reports/", "kernels": "comma-separated cell names"})
def matrix(c: Context, name: str = "latest", kernels: str = "", matrix_file: str = "matrix.yaml") -> None:
    """Boot every kernel in matrix.yaml, run the probe, write reports/NAME/."""
    opts = RunOptions(
        matrix_path=Path(matrix_file).resolve(),
        name=name,
        kernels=tuple(k for k in kernels.split(",") if k),
    )
    try:
        results = run_matrix(opts)
    except KmatrixError as exc:
        raise Exit(f"kmatrix: {exc}", code=exc.exit_code) from None
    code, summary = summarize(results)
    print(summary)
    if code:
        raise Exit(code=code)
