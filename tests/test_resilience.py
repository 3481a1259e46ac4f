"""Faults injected into real QEMU cells: a hanging init, a panic, a killed QEMU, SIGINT.

Each test asserts the recorded status, that the other results are kept, and that no QEMU
process is left behind.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.progress import Progress

pytestmark = pytest.mark.qemu
ROOT = Path(__file__).resolve().parents[1]

BASE = """
check_valid_until: false
guest: {suite: bookworm, memory: 256M, shm_size: 32M, disk_size: 64M}
probe: {size: 8M, scenarios: [memfd-write], cell_timeout: %(timeout)d}
oom: {experiments: []}
kernels:
"""
KERNEL = '  - {name: "%s", suite: bookworm, package: linux-image-cloud-amd64, cmdline: "%s"}\n'


def _matrix(tmp: Path, cells: list[tuple[str, str]], timeout: int = 120) -> Path:
    text = BASE % {"timeout": timeout} + "".join(KERNEL % c for c in cells)
    path = tmp / "matrix.yaml"
    path.write_text(text)
    return path


def _qemu_pids(tmp: Path) -> list[int]:
    """QEMU processes of this test's run (its work dir is cache/work/<run name>/<cell>)."""
    pattern = f"qemu-system.*/work/{tmp.name}/"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _run(tmp: Path, cells: list[tuple[str, str]], timeout: int = 120) -> dict[str, Any]:
    opts = RunOptions(
        matrix_path=_matrix(tmp, cells, timeout), name=tmp.name, reports_dir=tmp, force=True
    )
    return run_matrix(opts, Progress(io.StringIO(), live=False))


def test_hanging_init_ends_as_timeout_and_other_cells_are_kept(tmp_path: Path) -> None:
    # rdinit=/bin/busybox with "sleep 3600" as init's arguments: a guest that never reports.
    results = _run(tmp_path, [("hang", "rdinit=/bin/busybox sleep 3600"), ("good", "")], timeout=30)
    by_id = {c["id"]: c for c in results["cells"]}
    assert by_id["hang"]["status"] == "timeout"
    assert "before init started" in by_id["hang"]["reason"]
    tail = by_id["hang"]["console_tail"]
    assert any("Linux version" in line or "Freeing" in line for line in tail)
    assert by_id["good"]["status"] == "ok"
    saved = json.loads((tmp_path / tmp_path.name / "results.json").read_text())
    assert {c["id"] for c in saved["cells"]} == {"hang", "good"}
    assert _qemu_pids(tmp_path) == []


def test_panic_outside_a_panic_experiment_is_recorded(tmp_path: Path) -> None:
    # No such init and no root device: the kernel panics in mount_root.
    results = _run(tmp_path, [("panics", "rdinit=/nonexistent")])
    (cell,) = results["cells"]
    assert cell["status"] == "panic"
    assert "Unable to mount root fs" in cell["reason"]
    assert cell["duration_s"] < 60  # panic=-1 + -no-reboot: QEMU exits, no timeout wait


def test_killed_qemu_is_an_error(tmp_path: Path) -> None:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result.update(_run(tmp_path, [("victim", "rdinit=/bin/busybox sleep 3600")], 120))
        except Exception as exc:  # surfaced by the assertion below, with its message
            result["error"] = repr(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while not (pids := _qemu_pids(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids, "QEMU never started"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    worker.join(timeout=60)
    assert "error" not in result, result.get("error")
    (cell,) = result["cells"]
    assert cell["status"] == "error"
    assert "QEMU exit -9" in cell["reason"]


SIGINT_SCRIPT = """
import io, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from kmatrix.run.progress import Progress
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.errors import KmatrixError
opts = RunOptions(matrix_path=Path(sys.argv[2]), name=Path(sys.argv[3]).name,
                  reports_dir=Path(sys.argv[3]), jobs=1,
                  force=sys.argv[4] == "force")
try:
    run_matrix(opts, Progress(sys.stdout, live=False))
except KmatrixError as exc:
    print("ERROR", exc, flush=True)
    sys.exit(exc.exit_code)
"""


def test_sigint_mid_run_kills_qemu_keeps_finished_cells_and_resumes(tmp_path: Path) -> None:
    # A unique (ignored) kernel parameter: "second" must not be in the result cache from an
    # earlier test session, so the resumed run has to boot it.
    matrix = _matrix(
        tmp_path, [("first", ""), ("second", f"quiet kmatrix.t={uuid.uuid4().hex}")], 300
    )
    argv = [sys.executable, "-c", SIGINT_SCRIPT, str(ROOT / "src"), str(matrix), str(tmp_path)]
    proc = subprocess.Popen([*argv, "force"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "second: boot" in line:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == 2
    assert time.monotonic() - start < 15
    assert "interrupted" in rest
    assert _qemu_pids(tmp_path) == []
    saved = json.loads((tmp_path / tmp_path.name / "results.json").read_text())
    assert [c["id"] for c in saved["cells"]] == ["first"]
    assert saved["run"]["interrupted"]
    # The next run takes the finished cell from the cache instead of booting it again.
    again = subprocess.run([*argv, "resume"], capture_output=True, text=True, timeout=300)
    assert "first: ok (cached)" in again.stdout
    assert "second: ok" in again.stdout and "second: ok (cached)" not in again.stdout
