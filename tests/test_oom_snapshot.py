"""The saved OOM boot and its restores (cells.oom_boots, backends.qmp, probes/resume.py):
the plan disk's format on both sides, the QEMU command lines of a saved and a restored
boot, the swap disk copy, and what the lanes do when saving or restoring fails.

Real QEMU saves and restores in tests/test_qemu_oom.py.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kmatrix.backends.qemu import (
    PLAN_DISK_BYTES,
    QemuSpec,
    build_argv,
    copy_sparse,
    write_plan_disk,
)
from kmatrix.catalog import probe_module
from kmatrix.cells import oom_boots
from kmatrix.cells.plan import OomPlan
from kmatrix.errors import InfraError
from kmatrix.results.oom import BootOutput, Unit
from kmatrix.results.schema import ProbeOutput

RESUME = probe_module("resume")


def test_the_probe_reads_back_the_plan_the_host_writes(tmp_path: Path) -> None:
    units = [Unit("oom-global-memfd-unmapped", 0), Unit("oom-global-memfd-unmapped", 1),
             Unit("oom-no-killable", 2)]  # fmt: skip
    disk = tmp_path / "plan.img"
    write_plan_disk(disk, oom_boots.plan_block(units))
    block = disk.read_bytes()
    assert len(block) == PLAN_DISK_BYTES
    plan = RESUME.parse_block(block[: RESUME.BLOCK])
    assert plan == "oom-global-memfd-unmapped:0-1,oom-no-killable:2-2"


def test_an_empty_or_foreign_plan_disk_holds_no_plan(tmp_path: Path) -> None:
    disk = tmp_path / "plan.img"
    write_plan_disk(disk, b"")  # the saved boot's: it waits
    assert RESUME.parse_block(disk.read_bytes()[: RESUME.BLOCK]) is None
    assert RESUME.parse_block(b"KMXPLAN oom-no-killable:0-0") is None  # no newline yet
    assert RESUME.parse_block(b"\x53\xef" + bytes(4094)) is None


def test_a_plan_too_large_for_its_disk_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="does not fit"):
        write_plan_disk(tmp_path / "plan.img", b"x" * (PLAN_DISK_BYTES + 1))


SAVED = QemuSpec(
    vmlinuz=Path("/w/vmlinux"),
    initrd=Path("/w/saved.initrd"),
    console_log=Path("/w/saved.console.log"),
    result_log=Path("/w/saved.results.log"),
    memory_bytes=192 << 20,
    swap=Path("/w/saved.swap.img"),
    plan=Path("/w/saved.plan.img"),
    cpus=2,
    qmp=Path("/tmp/kmx-qmp-x/qmp"),
)


def _without_files(argv: list[str]) -> list[str]:
    return [a.replace("saved", "N").replace("oom-1", "N") for a in argv]


def test_a_restored_qemu_has_the_saved_ones_devices_in_the_same_order() -> None:
    restored = replace(
        SAVED, console_log=Path("/w/oom-1.console.log"), result_log=Path("/w/oom-1.results.log"),
        swap=Path("/w/oom-1.swap.img"), plan=Path("/w/oom-1.plan.img"), qmp=None,
        incoming=Path("/w/saved state"),
    )  # fmt: skip
    saved_argv, restored_argv = build_argv(SAVED), build_argv(restored)
    assert saved_argv[-2:] == ["-qmp", "unix:/tmp/kmx-qmp-x/qmp,server=on,wait=off"]
    # A path with a space is quoted for the shell QEMU runs the exec: command in.
    assert restored_argv[-2:] == ["-incoming", "exec:cat '/w/saved state'"]
    assert _without_files(saved_argv[:-2]) == _without_files(restored_argv[:-2])
    serials = [a for a in restored_argv if a.startswith("virtio-blk-pci")]
    assert serials == ["virtio-blk-pci,drive=kmxswap,serial=kmxswap",
                       "virtio-blk-pci,drive=kmxplan,serial=kmxplan"]  # fmt: skip


def test_the_swap_copy_keeps_the_header_and_the_holes(tmp_path: Path) -> None:
    src, dest = tmp_path / "swap.img", tmp_path / "copy.img"
    with src.open("wb") as f:
        f.write(b"\x01" * 4096)
        f.seek(4096 - 10 + (8 << 20))
        f.write(b"SWAPSPACE2")
    copy_sparse(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert os.stat(dest).st_blocks * 512 < (4 << 20)  # the zero megabytes stayed holes


def _plan(snapshot: bool) -> Any:
    from kmatrix.cells.plan import QemuPlan

    units = (Unit("oom-global-memfd-unmapped", 0), Unit("oom-no-killable", 0),
             Unit("oom-no-killable", 1))  # fmt: skip
    oom = OomPlan(units=units, repeats=2, timeout_s=30, memory_bytes=192 << 20, snapshot=snapshot)
    fields = {f: None for f in QemuPlan.__dataclass_fields__}
    return replace(QemuPlan(**fields), oom=oom, arch="amd64")  # type: ignore[arg-type]


def _fake_boot(calls: list[tuple[list[Unit], bool]], restore_fails: bool = False) -> Any:
    def boot(
        kernel: Any, userland: Any, plan: Any, workdir: Path, units: list[Unit],
        index: int, image: Path, cancelled: Any, snapshot: Any = None,
    ) -> BootOutput:  # fmt: skip
        calls.append((units, snapshot is not None))
        hello: Any = None if snapshot is not None and restore_fails else {"release": "6.1"}
        starts: list[dict[str, Any]] = [{"type": "oom", "event": "start", "name": u.name,
                                         "repeat": u.repeat} for u in units]  # fmt: skip
        return BootOutput(index, units, ProbeOutput(hello=hello, oom=starts), "",
                          {"duration_s": 1.0}, snapshot is not None)  # fmt: skip

    return boot


class _Kernel:
    vmlinuz = Path("/w/vmlinuz")


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, snapshot: bool, saved: bool,
         restore_fails: bool = False) -> tuple[list[tuple[list[Unit], bool]], Any]:  # fmt: skip
    calls: list[tuple[list[Unit], bool]] = []
    monkeypatch.setattr(oom_boots, "_boot", _fake_boot(calls, restore_fails))
    state = oom_boots.Snapshot(tmp_path / "saved.state", tmp_path / "saved.initrd", None)
    record = {
        "duration_s": 5.0, "save_s": 0.2 if saved else None,
        "size_bytes": 1 if saved else None, "error": None if saved else "panicked",
    }  # fmt: skip
    monkeypatch.setattr(oom_boots, "take_snapshot",
                        lambda *a: (state if saved else None, record, "console"))  # fmt: skip
    run = oom_boots.run_oom_boots(_Kernel(), None, _plan(snapshot), tmp_path / "w")  # type: ignore[arg-type]
    return calls, run


def test_every_lane_restores_the_saved_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls, run = _run(monkeypatch, tmp_path, snapshot=True, saved=True)
    assert len(calls) == 2 and all(restored for _, restored in calls)
    assert all(b["restored"] for b in run.boots) and run.snapshot["error"] is None


def test_without_a_saved_boot_the_lanes_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls, run = _run(monkeypatch, tmp_path, snapshot=True, saved=False)
    assert len(calls) == 2 and not any(restored for _, restored in calls)
    assert run.snapshot["error"] == "panicked" and not any(b["restored"] for b in run.boots)


def test_snapshot_off_takes_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(oom_boots, "take_snapshot", lambda *a: pytest.fail("no snapshot wanted"))
    calls: list[tuple[list[Unit], bool]] = []
    monkeypatch.setattr(oom_boots, "_boot", _fake_boot(calls))
    run = oom_boots.run_oom_boots(_Kernel(), None, _plan(False), tmp_path / "w")  # type: ignore[arg-type]
    assert len(calls) == 2 and run.snapshot is None


def test_a_restore_qemu_cannot_load_is_booted_instead(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls, run = _run(monkeypatch, tmp_path, snapshot=True, saved=True, restore_fails=True)
    # Each lane: a restore with no hello and no panic, then a boot of the same units.
    assert sorted(restored for _, restored in calls) == [False, False, True, True]
    assert [b["restored"] for b in run.boots] == [False, False]


def test_the_boots_table_counts_kernel_boots_and_restores() -> None:
    from kmatrix.report.oom import timing_table

    boots = [{"finished": 42, "duration_s": 40.0, "restored": True}] + [
        {"finished": 0, "duration_s": 2.0, "restored": True} for _ in range(5)
    ]
    saved = {"duration_s": 7.0, "save_s": 0.2, "size_bytes": 1, "error": None}
    cell = {"id": "6.12", "backend": "qemu", "oom_memory_bytes": 192 << 20}
    table = timing_table([cell | {"oom_boots": boots, "oom_snapshot": saved}])
    row = ["6.12", "192.0", "1", "6", "42", "57.0"]  # kernel boots, restored, repeats, seconds
    assert [c.strip() for c in table.splitlines()[-1].strip("|").split("|")] == row
    # Without a snapshot (older results, or oom.snapshot: false) every boot booted.
    plain = [b | {"restored": False} for b in boots]
    assert "|              6 |          0 |" in timing_table([cell | {"oom_boots": plain}])
