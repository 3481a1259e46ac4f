"""Process-level faults with real parts: kill -9 of `invoke matrix` while a guest runs, two
runs of one name, a disk that fills up mid-run (a real tmpfs), and a QEMU that cannot start.

Each boots at most one real QEMU guest at a time (marker ``qemu``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmatrix.errors import InfraError
from kmatrix.report.dirs import RunLocked, run_lock
from kmatrix.results.schema import load_results
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.progress import Progress

pytestmark = pytest.mark.qemu
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KMATRIX_CACHE") or Path.home() / ".cache" / "kmatrix")

BASE = """
check_valid_until: false
guest: {suite: bookworm, memory: 256M, shm_size: 32M, disk_size: 64M}
probe: {size: 8M, scenarios: [memfd-write], cell_timeout: 300}
oom: {experiments: []}
kernels:
"""
HANG = "rdinit=/bin/busybox sleep 3600"


def _matrix(tmp: Path, cells: list[str]) -> Path:
    path = tmp / "m.yaml"
    path.write_text(BASE + "".join(cells))
    return path


def _debian(name: str, cmdline: str) -> str:
    return (
        f'  - {{name: "{name}", suite: bookworm, package: linux-image-cloud-amd64, '
        f'cmdline: "{cmdline}"}}\n'
    )


def _qemu_pids(name: str) -> list[int]:
    """QEMU (and guard) processes of the run called ``name`` (work dir cache/work/NAME/)."""
    out = subprocess.run(
        ["pgrep", "-f", f"qemu-system.*/work/{name}/"], capture_output=True, text=True
    )
    return [int(p) for p in out.stdout.split()]


def _wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def report_name() -> Iterator[str]:
    """A fresh name under the project's reports/, removed afterwards (the test made it)."""
    name = f"test-fault-{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(ROOT / "reports" / name, ignore_errors=True)


def test_kill_9_of_invoke_matrix_leaves_no_qemu_and_the_old_results(
    tmp_path: Path, report_name: str
) -> None:
    out_dir = ROOT / "reports" / report_name
    # Recorded real results, not reports/latest (a user's own run rewrites it).
    previous = load_results(ROOT / "tests" / "fixtures" / "results" / "full-5-kernels.json")
    previous["cells"] = [previous["cells"][1] | {"id": "hang"}]
    out_dir.mkdir(parents=True)
    (out_dir / "results.json").write_text(json.dumps(previous))
    matrix = _matrix(tmp_path, [_debian("hang", HANG)])
    argv = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "matrix",
            "--matrix-file", str(matrix), "--name", report_name, "--force"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _qemu_pids(report_name), 240, "QEMU to start")
        # A second run of the same name is refused, naming the first one's pid.
        opts = RunOptions(matrix_path=matrix, name=report_name, force=True)
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"):
            run_matrix(opts, Progress(io.StringIO(), live=False))
        proc.kill()  # SIGKILL: kmatrix gets no chance to clean up
        proc.wait()
        _wait_for(lambda: not _qemu_pids(report_name), 5, "QEMU to die with kmatrix")
    finally:
        proc.kill()
    assert _qemu_pids(report_name) == []
    # The interrupted run did not replace the previous results of that name.
    kept = load_results(out_dir / "results.json")
    assert [c["id"] for c in kept["cells"]] == ["hang"]
    # The kernel released the dead run's lock: no stale lock blocks the next run.
    with run_lock(out_dir, CACHE / "work" / report_name):
        pass


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> None:
    # The last write, or the flush when closing, fails with ENOSPC: the disk is full.
    with contextlib.suppress(OSError), (directory / "filler").open("wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_mid_run_is_one_line_and_the_cell_is_kept(tmp_path: Path) -> None:
    name = f"full-{uuid.uuid4().hex[:8]}"
    matrix = _matrix(tmp_path, [_debian("c", f"kmatrix.t={uuid.uuid4().hex}")])
    result: dict[str, Any] = {}
    with _tmpfs(tmp_path / "reports", "2M") as reports:

        def run() -> None:
            opts = RunOptions(matrix_path=matrix, name=name, reports_dir=reports)
            try:
                result["ok"] = run_matrix(opts, Progress(io.StringIO(), live=False))
            except InfraError as exc:
                result["error"] = str(exc)

        worker = threading.Thread(target=run)
        worker.start()
        _wait_for(lambda: _qemu_pids(name), 240, "QEMU to start")
        _fill(reports)  # the disk fills up while the guest measures
        worker.join(timeout=400)
    assert "No space left on device" in result.get("error", ""), result
    assert "\n" not in result["error"] and "finished cells are kept" in result["error"]
    # Nothing measured was lost: the next run takes the cell from the result cache.
    again = run_matrix(
        RunOptions(matrix_path=matrix, name=name, reports_dir=tmp_path / "roomy"),
        Progress(io.StringIO(), live=False),
    )
    (cell,) = again["cells"]
    assert cell["status"] == "ok" and cell["cached"] is True


def test_qemu_that_cannot_start_ends_the_run_with_its_stderr(tmp_path: Path) -> None:
    bogus = tmp_path / "bzImage"
    bogus.write_text("not a kernel\n")
    cells = [f"  - {{name: {n}, path: {bogus}}}\n" for n in ("first", "second", "third")]
    opts = RunOptions(
        matrix_path=_matrix(tmp_path, cells), name=tmp_path.name, reports_dir=tmp_path, jobs=1
    )
    with pytest.raises(InfraError) as exc:
        run_matrix(opts, Progress(io.StringIO(), live=False))
    msg = str(exc.value)
    assert "exited at once" in msg and "linux kernel too old to load a ram disk" in msg, msg
    assert "2 queued cell(s) cancelled" in msg, msg
    saved = load_results(tmp_path / tmp_path.name / "results.json")
    assert [(c["id"], c["status"]) for c in saved["cells"]] == [("first", "error")]
