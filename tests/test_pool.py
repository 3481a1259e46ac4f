"""run_cells: the Docker cells run beside the QEMU cells, and a failure stops both queues.

The cells themselves are stand-ins (the QEMU and Docker cell runners replaced); what is
tested is the scheduling around them (run_cells, _run_one), with a real MatrixRun saving
real results files.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest

from kmatrix.config import parse_matrix
from kmatrix.errors import InfraError
from kmatrix.results.contract import Cell
from kmatrix.results.schema import new_cell
from kmatrix.run import pool
from kmatrix.run.matrix import RunOptions
from kmatrix.run.progress import Progress
from kmatrix.run.session import MatrixRun

MATRIX = """
check_valid_until: false
kernels:
  - {name: a, suite: bookworm, package: linux-image-cloud-amd64}
  - {name: b, suite: bookworm, package: linux-image-cloud-amd64}
  - {name: host, backend: docker, memory: 512M}
  - {name: host2, backend: docker, memory: 512M}
"""
WAIT_S = 20.0


def _run_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: Any) -> MatrixRun:
    matrix = parse_matrix(MATRIX)
    opts = RunOptions(matrix_path=tmp_path / "matrix.yaml", name="t", reports_dir=tmp_path, jobs=1)
    run = MatrixRun(opts, matrix, list(matrix.kernels), Progress(io.StringIO(), live=False))
    monkeypatch.setattr(pool, "_qemu_cell", lambda run, k, source, userland: fake(k))
    monkeypatch.setattr(pool, "_docker_cell", lambda run, k, userland: fake(k))
    sources = {"a": object(), "b": object()}  # resolved kernels, as far as _run_one looks
    pool.run_cells(run, sources, None)  # type: ignore[arg-type]
    return run


def _ok(name: str, backend: str) -> Cell:
    return new_cell(name, backend) | {"status": "ok"}  # type: ignore[operator, return-value]


def test_a_docker_cell_does_not_wait_behind_the_qemu_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docker_ran = threading.Event()
    saw: dict[str, bool] = {}

    def fake(k: Any) -> Cell:
        if k.backend == "docker":
            docker_ran.set()
        else:  # --jobs 1: were Docker cells queued behind it, this would time out
            saw[k.name] = docker_ran.wait(WAIT_S)
        return _ok(k.name, k.backend)

    run = _run_cells(tmp_path, monkeypatch, fake)
    assert saw == {"a": True, "b": True}
    assert sorted(c["id"] for c in run.results["cells"]) == ["a", "b", "host", "host2"]


def test_a_failed_cell_cancels_what_is_queued_in_both_pools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    host_running, a_failed = threading.Event(), threading.Event()

    def fake(k: Any) -> Cell:
        started.append(k.name)
        if k.name == "a":
            assert host_running.wait(WAIT_S)
            a_failed.set()
            raise InfraError("boom")
        if k.name == "host":
            host_running.set()
            assert a_failed.wait(WAIT_S)
        return _ok(k.name, k.backend)

    with pytest.raises(InfraError, match="cell a: boom; 2 queued cell"):
        _run_cells(tmp_path, monkeypatch, fake)
    assert sorted(started) == ["a", "host"]  # b and host2 never started


def test_a_run_records_the_expectations_it_started_with(tmp_path: Path) -> None:
    """What the end of `invoke matrix` checks (kmatrix.gate.check.gate_run): the lines of
    the matrix as the run read it, not the file as it is when the run ends."""
    matrix = parse_matrix(MATRIX + "expectations: ['memfd-write VmRSS < 1 MiB']\n")
    opts = RunOptions(matrix_path=tmp_path / "matrix.yaml", name="t", reports_dir=tmp_path)
    run = MatrixRun(opts, matrix, list(matrix.kernels), Progress(io.StringIO(), live=False))
    assert run.results["run"].get("expectations") == ["memfd-write VmRSS < 1 MiB"]
