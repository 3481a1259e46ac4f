"""run_qemu stops a running guest at its timeout, and as soon as its cell is cancelled.

A stand-in process (``sleep``) plays QEMU: what is tested is the waiting, killing and
reporting around it (backends/qemu.py _run_qemu), through the real guard process.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from kmatrix.backends import qemu
from kmatrix.errors import InfraError


def _running(marker: str) -> bool:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, timeout=10)
    return found.returncode == 0


def test_a_cancelled_cell_stops_its_running_boot_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(InfraError, match="cell failed elsewhere"):
        qemu.run_qemu(
            ["sleep", "31.5"], timeout=60, cancelled=lambda: time.monotonic() > start + 0.3
        )
    assert time.monotonic() - start < 5
    assert not _running("sleep 31.5")


def test_the_timeout_still_ends_a_boot_that_nobody_cancels() -> None:
    run = qemu.run_qemu(["sleep", "32.5"], timeout=1.2)
    assert run.timed_out and run.returncode is None
    assert 1.0 <= run.duration_s < 5
    assert not _running("sleep 32.5")


def test_a_boot_that_ends_by_itself_is_neither_timed_out_nor_stopped() -> None:
    run = qemu.run_qemu(["sleep", "0.7"], timeout=30, cancelled=lambda: False)
    assert not run.timed_out and run.returncode == 0
    assert run.duration_s < 5
