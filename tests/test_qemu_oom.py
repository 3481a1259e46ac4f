"""Integration: the OOM boots of a real Debian 6.1 kernel under QEMU (library, not invoke).

Asserts only what mm/oom_kill.c makes certain: oom_badness() counts mapped pages only
(get_mm_rss = file + anon + shmem *mapped* pages), so a holder whose memfd was filled by
write() and never mapped scores ~its interpreter and cannot be the first victim while a
hog holds far more anon memory; and with every task at oom_score_adj -1000,
out_of_memory() finds nothing to kill and panics ("System is deadlocked on memory").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from oomboots import measured_boots, run_oom_matrix

pytestmark = pytest.mark.qemu

MATRIX = """
check_valid_until: false
oom: {repeats: 2, experiments: [oom-global-memfd-unmapped, oom-no-killable], timeout: 30}
kernels:
  - {name: "6.1", suite: bookworm, package: linux-image-cloud-amd64}
"""


@pytest.fixture(scope="module")
def oom_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two repeats of each experiment: one saved boot, two restores of it."""
    run = run_oom_matrix(MATRIX, Path(tmp_path_factory.mktemp("oom")))
    return {"experiments": {e["name"]: e for e in run.experiments}, "boots": run.boots,
            "snapshot": run.snapshot}  # fmt: skip


def test_unmapped_memfd_holder_is_never_the_first_victim(oom_run: dict[str, Any]) -> None:
    exp = oom_run["experiments"]["oom-global-memfd-unmapped"]
    assert exp["status"] == "ok" and exp["repeats"] == 2
    assert all(first is not None and first != "holder" for first in exp["first_victim"])
    assert exp["constraint"] == "CONSTRAINT_NONE"
    assert not exp["panic"]
    for run in exp["runs"]:
        assert run["victims_source"] == "kernel"  # parsed from the console, not guessed
        assert run["shmem_restored"] is True  # the harness cleaned up between repeats
        assert all(k["role"] in ("hog", "bystander") for k in run["kills"])


def test_no_killable_ends_in_a_panic_recorded_as_its_outcome(oom_run: dict[str, Any]) -> None:
    exp = oom_run["experiments"]["oom-no-killable"]
    assert exp["status"] == "ok" and exp["repeats"] == 2
    assert exp["panic"] is True and exp["panic_expected"] is True
    assert exp["victims"] == [[], []]
    for run in exp["runs"]:
        assert run["status"] == "panic"
        assert run["panic_message"] == "System is deadlocked on memory"
        assert run["no_killable"] is True
        assert run["console_tail"]


def test_each_panic_costs_one_restore(oom_run: dict[str, Any]) -> None:
    """Restored lanes: each panic closes a lane of the calm repeats, one restore each (the
    calm repeat runs, then the panic ends the boot); out_of_memory() (mm/oom_kill.c)
    panics with nothing killable in both."""
    boots = measured_boots(oom_run["boots"])
    assert [(b["units"], b["finished"]) for b in boots] == [(2, 1), (2, 1)]
    assert [b["panic"] for b in boots] == ["System is deadlocked on memory"] * 2


def test_every_boot_is_a_restore_of_one_saved_boot(oom_run: dict[str, Any]) -> None:
    """The kernel booted once; each restore started the same kernel with the same memory."""
    saved = oom_run["snapshot"]
    assert saved["error"] is None and saved["size_bytes"] > 32 << 20
    boots = measured_boots(oom_run["boots"])
    assert all(b["restored"] for b in boots)
    assert len({(b["release"], b["mem_total"]) for b in boots}) == 1


def test_snapshot_off_boots_each_lane(tmp_path: Path) -> None:
    """oom.snapshot: false: no saved boot; the panic (mm/oom_kill.c out_of_memory(), nothing
    killable) ends a boot that booted the kernel itself."""
    text = MATRIX.replace("timeout: 30}", "timeout: 30, snapshot: false}").replace(
        "repeats: 2, experiments: [oom-global-memfd-unmapped, oom-no-killable]",
        "repeats: 1, experiments: [oom-no-killable]",
    )
    run = run_oom_matrix(text, tmp_path)
    assert run.snapshot is None
    (boot,) = measured_boots(run.boots)
    assert boot["restored"] is False and boot["panic"] == "System is deadlocked on memory"
