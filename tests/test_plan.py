"""Cell plans and the result-cache key (no QEMU): what a cell runs with is decided once, and
every input that changes what a cell measures changes its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmatrix.cells.plan import DockerPlan, QemuPlan, plan_units
from kmatrix.cells.qemu import cell_args
from kmatrix.config import DockerKernel, parse_matrix
from kmatrix.errors import ExpectationFailed
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.userland import Userland
from kmatrix.run import ci
from kmatrix.run.plan import cache_key, docker_plan, qemu_plan

MIB = 1024 * 1024
FIXTURES = Path(__file__).parent / "fixtures"
BASE = """\
guest: {memory: 512M, shm_size: 128M, disk_size: 256M, cpus: 2}
probe: {size: 64M, scenarios: all, repeats: 3, cell_timeout: 900}
oom: {repeats: 3, experiments: all, memory: 192M, timeout: 30}
kernels:
  - {name: "6.1", suite: bookworm, package: linux-image-cloud-amd64}
  - {name: host, backend: docker, memory: 384M, pids_limit: 64}
"""


def _prepared(sha: str = "a" * 64) -> PreparedKernel:
    return PreparedKernel("6.1", Path("/k/vmlinuz"), None, "6.1.0", {}, {"sha256": sha})


def _key(text: str = BASE, accel: str = "tcg", **kw: str) -> str:
    matrix = parse_matrix(text)
    plan = qemu_plan(matrix, matrix.kernels[0], accel)  # type: ignore[arg-type]
    args = {"prepared": _prepared(), "probe": "p" * 64, "qemu": "QEMU 7.2.0", "userland": "u"}
    args.update(kw)
    userland = Userland(str(args["userland"]), Path("/u"), Path("/u.cpio"), {})
    return cache_key(plan, args["prepared"], userland, str(args["probe"]), str(args["qemu"]))  # type: ignore[arg-type]


def test_qemu_plan_takes_the_kernel_sizes_over_the_guest() -> None:
    text = BASE.replace("package: linux-image-cloud-amd64}", "package: p, memory: 1G, cmdline: x}")
    matrix = parse_matrix(text)
    plan = qemu_plan(matrix, matrix.kernels[0], "tcg")  # type: ignore[arg-type]
    assert isinstance(plan, QemuPlan)
    assert (plan.memory_bytes, plan.shm_size, plan.cmdline) == (1024 * MIB, 128 * MIB, "x")
    assert (
        plan.cpu == "max,-erms,-fsrm,-smap"
        and qemu_plan(matrix, matrix.kernels[0], "kvm").cpu == "host"
    )  # type: ignore[arg-type]
    assert qemu_plan(matrix, matrix.kernels[0], "kvm").tcg_thread is None  # type: ignore[arg-type]
    assert len(plan.oom.units) == 3 * len(plan_units("all", 1))
    assert plan.tcg_thread == "single"  # the default; why: backends/qemu.py, TcgThread
    assert cell_args(plan)["KMX_SIZE_MIB"] == "64" and cell_args(plan)["KMX_SWAP"] == "0"
    with pytest.raises(AttributeError):
        plan.memory_bytes = 1  # type: ignore[misc]  # frozen


def test_docker_plan_has_the_container_limits() -> None:
    matrix = parse_matrix(BASE)
    kernel = matrix.kernels[1]
    assert isinstance(kernel, DockerKernel)
    plan = docker_plan(matrix, kernel)
    assert isinstance(plan, DockerPlan)
    assert (plan.memory_bytes, plan.shm_size, plan.pids_limit) == (384 * MIB, 64 * MIB, 64)
    assert plan.accel == "container" and plan.require_engine in (True, False)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('name: "6.1"', 'name: "6.1b"'),
        ("memory: 512M,", "memory: 640M,"),
        ("shm_size: 128M", "shm_size: 96M"),
        ("disk_size: 256M", "disk_size: 320M"),
        ("cpus: 2", "cpus: 1"),
        ("cpus: 2}", "cpus: 2, swap: 96M}"),
        ("cpus: 2}", "cpus: 2, tcg_thread: multi}"),
        ("size: 64M", "size: 32M"),
        ("scenarios: all", "scenarios: [memfd-write]"),
        ("repeats: 3, cell", "repeats: 2, cell"),
        ("cell_timeout: 900", "cell_timeout: 600"),
        ("repeats: 3, experiments", "repeats: 1, experiments"),
        ("experiments: all", "experiments: [oom-memcg-v2]"),
        ("memory: 192M", "memory: 256M"),
        ("timeout: 30", "timeout: 20"),
        ("package: linux-image-cloud-amd64}", "package: linux-image-cloud-amd64, memory: 1G}"),
        ("package: linux-image-cloud-amd64}", "package: linux-image-cloud-amd64, cmdline: q}"),
        ("package: linux-image-cloud-amd64}", "package: linux-image-cloud-amd64, shm_size: 64M}"),
        ("package: linux-image-cloud-amd64}", "package: linux-image-cloud-arm64, arch: arm64}"),
    ],
)
def test_every_measured_setting_changes_the_cache_key(old: str, new: str) -> None:
    assert old in BASE
    assert _key(BASE.replace(old, new, 1)) != _key()


def test_accel_digests_and_qemu_change_the_cache_key_and_checks_do_not() -> None:
    base = _key()
    assert _key(accel="kvm") != base
    assert _key(prepared=_prepared("b" * 64)) != base  # type: ignore[arg-type]
    assert _key(probe="q" * 64) != base
    assert _key(qemu="QEMU 8.0.0") != base
    assert _key(userland="v") != base
    # KVM gives each vCPU its thread whatever guest.tcg_thread says: no re-measuring.
    multi = BASE.replace("cpus: 2}", "cpus: 2, tcg_thread: multi}")
    assert _key(multi, accel="kvm") == _key(accel="kvm")
    # How the run is checked and where packages come from are not what is measured.
    checked = BASE + "expectations:\n  - memfd-write VmRSS_delta < 1 MiB\n"
    assert _key("check_valid_until: false\n" + checked) == base


def test_run_cell_writes_its_output_then_gates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = json.loads((FIXTURES / "results" / "dev-6.1.json").read_text())
    monkeypatch.setattr(ci, "run_matrix", lambda opts, progress=None: results)
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(
        "kernels:\n  - {name: '6.1', suite: bookworm, package: linux-image-cloud-amd64}\n"
        "expectations:\n  - anon-private VmRSS_delta < 1 MiB on 6.1\n"
    )
    output = tmp_path / "out" / "cell.json"
    with pytest.raises(ExpectationFailed, match=r"anon-private VmRSS_delta < 1 MiB on 6\.1"):
        ci.run_cell(matrix, "6.1", output, reports_dir=tmp_path / "reports")
    # The merge job must see what was measured even when an expectation failed.
    assert json.loads(output.read_text())["cells"] == results["cells"]
