"""Integration: boot a real Debian kernel under QEMU with the real probe and check the facts.

These tests download Debian's 6.1 cloud kernel and the bookworm userland through the
verified archive client (cached under ~/.cache/kmatrix) and really boot them under TCG.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from kmatrix import catalog
from kmatrix.backends import qemu
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.progress import Progress

MIB = 1 << 20
SIZE = 32 * MIB

MATRIX = """
check_valid_until: false
guest: {suite: bookworm, memory: 384M, shm_size: 64M, disk_size: 128M}
probe: {size: 32M, cell_timeout: 600}
oom: {experiments: []}  # tests/test_qemu_oom.py boots the OOM experiments
kernels:
  - {name: "6.1", suite: bookworm, package: linux-image-cloud-amd64}
"""

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real, uncached boot of the 6.1 kernel, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("qemu")
    (tmp / "matrix.yaml").write_text(MATRIX)
    opts = RunOptions(matrix_path=tmp / "matrix.yaml", name="it", reports_dir=tmp, force=True)
    results = run_matrix(opts, Progress(io.StringIO(), live=False))
    assert (tmp / "it" / "report.md").read_text().startswith("# kmatrix report")
    assert (tmp / "it" / "console" / "6.1.log").stat().st_size > 1000
    (only,) = results["cells"]
    assert only["status"] == "ok", only.get("reason")
    assert only["cached"] is False
    return dict(only)


def _m(cell: dict[str, Any], scenario: str) -> dict[str, int]:
    sc = next(s for s in cell["scenarios"] if s["name"] == scenario)
    return dict(sc["metrics"])


def test_every_scenario_ran_three_times_and_reports_the_median(cell: dict[str, Any]) -> None:
    """Three passes (probe.repeats' default); the FIRST_PASS_ONLY scenarios run once."""
    assert len(cell["scenarios"]) == len(catalog.SCENARIOS)  # one per scenario, not per repeat
    for sc in cell["scenarios"]:
        repeats = sc["repeats"]
        if sc["name"] in catalog.FIRST_PASS_ONLY:
            assert len(repeats) == 1, sc["name"]
            continue
        assert len(repeats) == 3, sc["name"]
        for key, median in sc["metrics"].items():
            values = sorted(r["metrics"][key] for r in repeats)
            assert median == values[1], (sc["name"], key)
            assert sc["spread"][key] == values[-1] - values[0]


def test_cell_provenance(cell: dict[str, Any]) -> None:
    k = cell["kernel"]
    assert k["release"].startswith("6.1.")
    assert k["package"].startswith("linux-image-6.1.")
    assert len(k["sha256"]) == 64
    assert k["config"]["CONFIG_MEMCG"] == "y"
    assert cell["accel"] == "tcg"
    assert cell["memory_bytes"] == 384 * MIB
    assert cell["boot"] == "pvh"  # Debian's amd64 kernels carry the PVH entry note
    assert cell["cpu"] == "max,-erms,-fsrm,-smap"
    # run_cells lets the larger of --jobs (default: the cores) and cores + 1 QEMUs run at
    # once (run/pool.py), unless a runner container's environment says (backends/qemu.py).
    assert cell["qemu_slots"] == int(os.environ.get(qemu.SLOTS_ENV) or qemu.default_slots())


def test_the_cgroup2_mount_options_are_recorded(cell: dict[str, Any]) -> None:
    """The guest's init mounts cgroup2 with favordynmods, which 6.1 has (since 6.0:
    kernel/cgroup/cgroup.c, cgroup2_fs_parameters and cgroup_favor_dynmods()); the probe
    records the options as the kernel shows them (cgroup2's show_options in mountinfo)."""
    options = cell["probe"]["knobs"]["cgroup2_options"].split(",")
    assert "favordynmods" in options and "rw" in options


def test_memfd_write_is_invisible_to_rss_but_not_to_shmem(cell: dict[str, Any]) -> None:
    m = _m(cell, "memfd-write")
    assert m["VmRSS_delta"] < MIB
    assert m["RssShmem_delta"] < MIB
    assert m["meminfo_Shmem_delta"] >= 0.95 * SIZE
    # memcg charges shmem to the cgroup of the task that allocated it.
    assert m["cgroup_shmem_delta"] >= 0.95 * SIZE
    assert m["oom_score_delta"] <= 2


def test_mapped_memfd_counts_as_rss_shmem(cell: dict[str, Any]) -> None:
    m = _m(cell, "memfd-mmap")
    assert m["RssShmem_delta"] >= 0.95 * SIZE
    assert m["RssAnon_delta"] < MIB
    assert m["oom_score_delta"] > _m(cell, "memfd-write")["oom_score_delta"] + 10


def test_munmap_drops_rss_but_keeps_shmem(cell: dict[str, Any]) -> None:
    m = _m(cell, "memfd-munmap")
    assert m["VmRSS_delta"] < MIB
    assert m["meminfo_Shmem_delta"] >= 0.95 * SIZE


def test_python_default_mmap_is_shmem_not_anon(cell: dict[str, Any]) -> None:
    shared, private = _m(cell, "anon-shared"), _m(cell, "anon-private")
    assert shared["RssShmem_delta"] >= 0.95 * SIZE and shared["RssAnon_delta"] < MIB
    assert private["RssAnon_delta"] >= 0.95 * SIZE and private["RssShmem_delta"] < MIB


def test_two_processes_share_the_pss(cell: dict[str, Any]) -> None:
    m = _m(cell, "memfd-2proc")
    assert 0.4 * SIZE <= m["Pss_delta"] <= 0.6 * SIZE


def test_memfd_ignores_dev_shm_size_but_tmpfile_does_not(cell: dict[str, Any]) -> None:
    memfd = next(s for s in cell["scenarios"] if s["name"] == "memfd-over-shm-limit")
    tmpfile = next(s for s in cell["scenarios"] if s["name"] == "tmpfile-over-shm-limit")
    assert memfd["errno"] is None
    assert memfd["metrics"]["meminfo_Shmem_delta"] > 64 * MIB
    assert tmpfile["errno"] == "ENOSPC"
    assert tmpfile["metrics"]["meminfo_Shmem_delta"] <= 64 * MIB


def test_disk_tmpfile_is_page_cache_not_shmem(cell: dict[str, Any]) -> None:
    m = _m(cell, "tmpfile-disk-write")
    assert m["meminfo_Cached_delta"] >= 0.9 * SIZE
    assert m["meminfo_Shmem_delta"] < MIB


def test_feature_probes_record_an_outcome(cell: dict[str, Any]) -> None:
    noexec = next(s for s in cell["scenarios"] if s["name"] == "memfd-noexec-seal")
    # MFD_NOEXEC_SEAL arrived in 6.3: Debian's 6.1 must refuse the flag.
    assert noexec["errno"] == "EINVAL"


def test_cached_rerun_reuses_the_cell(tmp_path: Path, cell: dict[str, Any]) -> None:
    (tmp_path / "matrix.yaml").write_text(MATRIX)
    opts = RunOptions(matrix_path=tmp_path / "matrix.yaml", name="again", reports_dir=tmp_path)
    results = run_matrix(opts, Progress(io.StringIO(), live=False))
    (again,) = results["cells"]
    assert again["cached"] is True
    assert again["scenarios"] == cell["scenarios"]
