"""Integration: an arm64 Debian kernel with an arm64 userland under qemu-system-aarch64 (TCG).

Downloads trixie's arm64 cloud kernel and the bookworm arm64 userland through the verified
archive client and boots them for real; results come back over the virtio-serial port.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest

from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.progress import Progress

MIB = 1 << 20
SIZE = 8 * MIB

MATRIX = """
check_valid_until: false
guest: {suite: bookworm, memory: 256M, shm_size: 64M, disk_size: 64M}
probe: {size: 8M, scenarios: [memfd-write], cell_timeout: 300}
oom: {experiments: []}
kernels:
  - {name: "6.12-arm64", suite: trixie, package: linux-image-cloud-arm64, arch: arm64}
"""

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-aarch64") is None,
        reason="qemu-system-aarch64 missing: apt-get install qemu-system-arm",
    ),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One real, uncached arm64 boot, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("arm64")
    (tmp / "matrix.yaml").write_text(MATRIX)
    opts = RunOptions(matrix_path=tmp / "matrix.yaml", name="it", reports_dir=tmp, force=True)
    results = run_matrix(opts, Progress(io.StringIO(), live=False))
    (only,) = results["cells"]
    assert only["status"] == "ok", (only.get("reason"), only.get("console_tail"))
    return dict(results), tmp / "it"


def test_the_arm64_kernel_and_userland_really_ran(run: tuple[dict[str, Any], Path]) -> None:
    results, _ = run
    (cell,) = results["cells"]
    assert cell["arch"] == "arm64" and cell["kernel"]["arch"] == "arm64"
    assert cell["kernel"]["release"].endswith("-arm64")
    assert cell["kernel"]["package"].startswith("linux-image-6.12.")
    assert cell["probe"]["machine"] == "aarch64"
    assert cell["accel"] == "tcg"
    assert results["run"]["host"]["qemu_arm64"].startswith("QEMU emulator version")
    assert "libc6" in results["run"]["guest"]["packages_arm64"]


def test_memfd_write_is_shmem_not_rss_on_arm64(run: tuple[dict[str, Any], Path]) -> None:
    results, _ = run
    (cell,) = results["cells"]
    (sc,) = cell["scenarios"]
    assert sc["name"] == "memfd-write" and sc["size_bytes"] == SIZE
    m = sc["metrics"]
    assert m["VmRSS_delta"] < MIB
    assert 0.95 * SIZE <= m["meminfo_Shmem_delta"] <= SIZE + 2 * MIB


def test_report_names_the_architecture(run: tuple[dict[str, Any], Path]) -> None:
    _, out = run
    report = (out / "report.md").read_text()
    assert "| arch " in report and "arm64" in report
    assert "QEMU (arm64)" in report
    console = (out / "console" / "6.12-arm64.log").read_text(errors="replace")
    assert "Machine model: linux,dummy-virt" in console
    assert "results to /dev/vport" in console


def test_kpti_is_off_as_the_command_line_asks(run: tuple[dict[str, Any], Path]) -> None:
    """arch/arm64/kernel/cpufeature.c: parse_kpti() (early_param "kpti") sets __kpti_forced
    to -1 for ``kpti=0``; unmap_kernel_at_el0() forces KPTI on for KASLR only while
    __kpti_forced is 0, and prints who forced it. The hello records the command line."""
    results, out = run
    (cell,) = results["cells"]
    assert "kpti=0" in cell["probe"]["cmdline"].split()
    console = (out / "console" / "6.12-arm64.log").read_text(errors="replace")
    assert "kernel page table isolation forced OFF by kpti command line option" in console
