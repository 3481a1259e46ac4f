"""Integration: a real Debian 6.12 kernel under QEMU when the memfd itself is the pressure.

OOM boots (2 repeats each, no experiment that panics) of the experiments users fear:
a writer growing an unmapped memfd among bystanders, a memory.oom.group kill with no
other reference to the holder's memfd, and a memfd charged in one cgroup and used from
another. Each test asserts only what the kernel source makes certain (see docstrings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from oomboots import measured_boots, run_oom_matrix

pytestmark = pytest.mark.qemu

MATRIX = """
check_valid_until: false
oom:
  repeats: 2
  experiments: [oom-global-memfd-growth, oom-memcg-v2-group, oom-memcg-cross-charge]
  timeout: 30
kernels:
  - {name: "6.12", suite: trixie, package: linux-image-cloud-amd64}
"""


@pytest.fixture(scope="module")
def pressure(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = run_oom_matrix(MATRIX, Path(tmp_path_factory.mktemp("oom")))
    return {e["name"]: e for e in run.experiments} | {"boots": run.boots, "saved": run.snapshot}


def _assert_memcg_oom(run: dict[str, Any]) -> None:
    """A memcg OOM: every Killed line says "Memory cgroup out of memory" (printed always),
    and where dump_header() was not rate-limited away its constraint is CONSTRAINT_MEMCG."""
    assert run["kills"] and all(k["memcg"] for k in run["kills"])
    assert run["constraint"] in (None, "CONSTRAINT_MEMCG")


def test_growing_memfd_kills_bystanders_first_and_more_than_one(pressure: dict[str, Any]) -> None:
    """mm/oom_kill.c oom_badness() scores get_mm_rss() + swap entries + page tables: a
    memfd filled by write() is never mapped, so none of its pages is in the writer's
    MM_SHMEMPAGES (counted only when a page is mapped into the mm). The writer scores
    its interpreter (~10 MiB) against bystanders holding 10-20 % of MemAvailable in
    anon memory, so select_bad_process() picks a bystander. Without swap the memfd's
    pages cannot be reclaimed (mm/vmscan.c can_reclaim_anon_pages()), the writer keeps
    writing, and the next allocation OOMs again: more than one process dies."""
    exp = pressure["oom-global-memfd-growth"]
    assert exp["status"] == "ok" and exp["repeats"] == 2, exp.get("reason")
    for run, victims in zip(exp["runs"], exp["victims"], strict=True):
        assert run["victims_source"] == "kernel"
        assert victims[0].startswith("bystander"), victims
        assert len(victims) > 1, victims
        assert all(k["role"] != "other" for k in run["kills"])  # only the experiment's roles
    assert not exp["panic"]


def test_group_kill_frees_the_memfd_nobody_else_holds(pressure: dict[str, Any]) -> None:
    """mm/oom_kill.c oom_kill_process(): with memory.oom.group=1 every task of the cgroup
    is killed (mem_cgroup_scan_tasks(oom_group, oom_kill_memcg_member)), the holder too.
    The harness keeps no reference, so the holder's exit drops the last one and
    mm/shmem.c shmem_evict_inode() frees the pages: Shmem falls back."""
    exp = pressure["oom-memcg-v2-group"]
    assert exp["status"] == "ok" and exp["repeats"] == 2, exp.get("reason")
    assert all("holder" in victims for victims in exp["victims"])
    assert exp["shmem_freed"] == [True, True]
    assert exp["charge_stayed"] == [False, False]
    for run in exp["runs"]:
        _assert_memcg_oom(run)


def test_cross_charge_stays_with_the_creator_cgroup(pressure: dict[str, Any]) -> None:
    """mm/memcontrol.c charges a shmem folio to the memcg of the task that allocates it
    (shmem_alloc_and_add_folio -> mem_cgroup_charge(folio, fault_mm, gfp)) and moves it
    on neither a later mmap by another task nor the allocator's exit: cgroup A keeps the
    creator's half after it exits. A's OOM kills only tasks in A (select_bad_process ->
    mem_cgroup_scan_tasks(oc->memcg)): never the receiver in B."""
    exp = pressure["oom-memcg-cross-charge"]
    assert exp["status"] == "ok" and exp["repeats"] == 2, exp.get("reason")
    for run in exp["runs"]:
        cross = run["cross"]
        assert cross["a_kept_charge"] is True
        a = cross["after_handover"]["cgroups"]["a"]["shmem"]
        assert a >= run["sizes"]["holder"] * 0.9
        assert "receiver" not in run["victims"] and run["victims"] == ["hog"]
        _assert_memcg_oom(run)


def test_one_kernel_boot_for_experiments_that_do_not_panic(pressure: dict[str, Any]) -> None:
    """The kernel booted once (the saved boot); the calm repeats ran in two restores of it."""
    assert pressure["saved"]["error"] is None
    boots = measured_boots(pressure["boots"])
    assert len(boots) == 2 and all(b["restored"] and not b["panic"] for b in boots)
    assert sum(b["finished"] for b in boots) == 6
