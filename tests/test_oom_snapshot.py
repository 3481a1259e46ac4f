"""The saved OOM boot and its restores (cells.oom_boots, backends.qmp, probes/resume.py):
the plan disk's format on both sides, the QEMU command lines of a saved and a restored
boot, the swap disk copy, and what the lanes do when saving or restoring fails.

Real QEMU saves and restores in tests/test_qemu_oom.py.
"""

from __future__ import annotations

import errno
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
from kmatrix.cells.oom_saved import Snapshot, plan_block, restored_spec
from kmatrix.cells.plan import OomPlan
from kmatrix.errors import InfraError
from kmatrix.results.oom import BootOutput, Unit
from kmatrix.results.schema import ProbeOutput

RESUME = probe_module("resume")


def test_the_probe_reads_back_the_plan_the_host_writes(tmp_path: Path) -> None:
    units = [Unit("oom-global-memfd-unmapped", 0), Unit("oom-global-memfd-unmapped", 1),
             Unit("oom-no-killable", 2)]  # fmt: skip
    disk = tmp_path / "plan.img"
    write_plan_disk(disk, plan_block(units))
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


def test_a_plan_longer_than_the_block_the_probe_reads_is_refused(tmp_path: Path) -> None:
    # Every repeat on its own (odd indexes only): a plan of more than 4096 bytes.
    units = [Unit("oom-global-memfd-growth-kill-allocating", r) for r in range(0, 400, 2)]
    with pytest.raises(InfraError, match=f"more than the {RESUME.BLOCK}.*oom.snapshot: false"):
        plan_block(units)
    with pytest.raises(InfraError, match="does not fit"):
        write_plan_disk(tmp_path / "plan.img", b"x" * (PLAN_DISK_BYTES + 1))


SAVED = QemuSpec(
    vmlinuz=Path("/w/vmlinux"),
    initrd=Path("/w/saved.initrd"),
    console_log=Path("/w/saved.console.log"),
    result_log=Path("/w/saved.results.log"),
    memory_bytes=192 << 20,
    tcg_thread="single",
    swap=Path("/w/saved.swap.img"),
    plan=Path("/w/saved.plan.img"),
    cpus=2,
    append="quiet",
    qmp=Path("/tmp/kmx-qmp-x/qmp"),
)


def _files_renamed(argv: list[str]) -> list[str]:
    return [a.replace("saved", "N").replace("oom-1", "N") for a in argv]


def test_a_restored_qemu_has_the_saved_ones_devices_in_the_same_order() -> None:
    snapshot = Snapshot(SAVED, Path("/w/saved state"))
    restored = restored_spec(snapshot, Path("/w"), "oom-1", Path("/w/oom-1.swap.img"),
                             Path("/w/oom-1.plan.img"))  # fmt: skip
    saved_argv, restored_argv = build_argv(SAVED), build_argv(restored)
    assert saved_argv[-2:] == ["-qmp", "unix:/tmp/kmx-qmp-x/qmp,server=on,wait=off"]
    # A path with a space is quoted for the shell QEMU runs the exec: command in.
    assert restored_argv[-2:] == ["-incoming", "exec:cat '/w/saved state'"]
    # Same kernel, initrd, command line, memory, CPUs, devices; only the files differ.
    assert _files_renamed(saved_argv[:-2]) == _files_renamed(restored_argv[:-2])
    assert "/w/saved.initrd" in restored_argv and "/w/oom-1.plan.img" in " ".join(restored_argv)
    disks = [a for a in restored_argv if a.startswith("virtio-blk-pci")]
    assert disks == ["virtio-blk-pci,drive=kmxswap,serial=kmxswap",
                     "virtio-blk-pci,drive=kmxplan,serial=kmxplan"]  # fmt: skip


def test_the_swap_copy_keeps_the_header_and_the_holes(tmp_path: Path) -> None:
    src, dest = tmp_path / "swap.img", tmp_path / "copy.img"
    with src.open("wb") as f:
        f.write(b"\x01" * 4096)
        f.seek(3 << 20)  # data between holes, in a chunk of its own
        f.write(b"\x02" * 100)
        f.seek(4096 - 10 + (8 << 20))
        f.write(b"SWAPSPACE2")
    copy_sparse(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert os.stat(dest).st_blocks * 512 < (4 << 20)  # the zero megabytes stayed holes


def test_the_swap_copy_keeps_every_data_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small hole, then data longer than any read-ahead buffer; and the same copy where
    the filesystem cannot tell data from holes (lseek SEEK_DATA refused: EINVAL)."""
    src = tmp_path / "swap.img"
    with src.open("wb") as f:
        f.write(b"\x01" * 4096)
        f.seek(8192)
        f.write(bytes(range(256)) * 800)  # 200 KiB from 8 KiB
        f.truncate(4 << 20)
    copy_sparse(src, tmp_path / "a.img", chunk=64 << 10)
    assert (tmp_path / "a.img").read_bytes() == src.read_bytes()
    real_lseek = os.lseek

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        if how == os.SEEK_DATA:
            raise OSError(errno.EINVAL, "not supported")
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", no_seek_data)
    copy_sparse(src, tmp_path / "b.img")
    assert (tmp_path / "b.img").read_bytes() == src.read_bytes()


UNITS = (Unit("oom-global-memfd-unmapped", 0), Unit("oom-global-memfd-unmapped", 1),
         Unit("oom-global-memfd-mapped", 0), Unit("oom-no-killable", 0),
         Unit("oom-no-killable", 1))  # fmt: skip


def _plan(snapshot: bool) -> Any:
    from kmatrix.cells.plan import QemuPlan

    oom = OomPlan(units=UNITS, repeats=2, timeout_s=30, memory_bytes=192 << 20, snapshot=snapshot)
    fields = {f: None for f in QemuPlan.__dataclass_fields__}
    return replace(QemuPlan(**fields), oom=oom, arch="amd64")  # type: ignore[arg-type]


Calls = list[tuple[list[Unit], bool]]


def _fake_boot(calls: Calls, restore_fails: bool = False) -> Any:
    def boot(
        kernel: Any, userland: Any, plan: Any, workdir: Path, units: list[Unit],
        index: int, image: Path, cancelled: Any, snapshot: Any = None,
    ) -> BootOutput:  # fmt: skip
        calls.append((units, snapshot is not None))
        hello: Any = None if snapshot is not None and restore_fails else {"release": "6.1"}
        starts: list[dict[str, Any]] = [] if hello is None else [
            {"type": "oom", "event": "start", "name": u.name, "repeat": u.repeat} for u in units
        ]  # fmt: skip
        return BootOutput(index, units, ProbeOutput(hello=hello, oom=starts), "",
                          {"duration_s": 1.0}, snapshot is not None)  # fmt: skip

    return boot


class _Kernel:
    vmlinuz = Path("/w/vmlinuz")


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved: bool,
         restore_fails: bool = False) -> tuple[Calls, Any, Snapshot]:  # fmt: skip
    calls: Calls = []
    monkeypatch.setattr(oom_boots, "_boot", _fake_boot(calls, restore_fails))
    spec = replace(SAVED, initrd=tmp_path / "saved.initrd", swap=tmp_path / "saved.swap.img")
    state = Snapshot(spec, tmp_path / "saved.state")
    for path in state.files():
        path.write_bytes(b"x")
    record = {
        "duration_s": 5.0, "save_s": 0.2 if saved else None,
        "size_bytes": 1 if saved else None, "error": None if saved else "panicked",
    }  # fmt: skip
    monkeypatch.setattr(oom_boots, "take_snapshot",
                        lambda *a: (state if saved else None, record, "console"))  # fmt: skip
    run = oom_boots.run_oom_boots(_Kernel(), None, _plan(True), tmp_path / "w")  # type: ignore[arg-type]
    return calls, run, state


def test_every_lane_restores_the_saved_boot_and_its_files_go(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls, run, state = _run(monkeypatch, tmp_path, saved=True)
    # Restored: the three calm repeats in two lanes, each closed by one of the two panics.
    assert sorted(len(units) for units, _ in calls) == [2, 3]
    assert all(restored for _, restored in calls)
    assert all(b["restored"] for b in run.boots) and run.snapshot["error"] is None
    assert not any(p.exists() for p in state.files())


def test_without_a_saved_boot_the_lanes_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls, run, _ = _run(monkeypatch, tmp_path, saved=False)
    # Booted: one lane for every calm repeat and the first panic, one for the second.
    assert sorted(len(units) for units, _ in calls) == [1, 4]
    assert not any(restored for _, restored in calls)
    assert run.snapshot["error"] == "panicked" and not any(b["restored"] for b in run.boots)


def test_snapshot_off_takes_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(oom_boots, "take_snapshot", lambda *a: pytest.fail("no snapshot wanted"))
    calls: Calls = []
    monkeypatch.setattr(oom_boots, "_boot", _fake_boot(calls))
    run = oom_boots.run_oom_boots(_Kernel(), None, _plan(False), tmp_path / "w")  # type: ignore[arg-type]
    assert len(calls) == 2 and run.snapshot is None


def test_a_restore_that_brings_no_hello_is_kept_and_its_units_booted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls, run, _ = _run(monkeypatch, tmp_path, saved=True, restore_fails=True)
    failed = [b for b in run.boots if b["restored"]]
    booted = [b for b in run.boots if not b["restored"]]
    # Each failed restore is recorded, and every unit still ran in a boot.
    assert failed and all(b["mem_total"] is None and b["finished"] == 0 for b in failed)
    assert sum(b["units"] for b in booted) == len(UNITS)
    assert len(calls) == len(run.boots) and len(failed) <= 3  # at most one per lane


def test_the_saver_records_a_failed_save_instead_of_raising(tmp_path: Path) -> None:
    from kmatrix.cells.oom_saved import _Saver

    console = tmp_path / "console.log"
    saver = _Saver(console, tmp_path / "no-such-socket", tmp_path / "state")
    console.write_text("booting\n")
    saver.poll()
    assert saver.error is None and saver.save_s is None  # not ready yet: nothing tried
    console.write_text(f"booting\n{RESUME.MARK}\n")
    saver.poll()
    assert saver.error and "oom.snapshot: false" in saver.error and saver.save_s is None


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


def _fake_qmp(path: Path, answers: dict[str, list[dict[str, Any]]]) -> list[str]:
    """A QMP server on ``path`` answering each command with the next of its answers (an
    event before each, which the client must skip); returns the commands it got."""
    import json
    import socket
    import threading

    got: list[str] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        f = conn.makefile("rw")
        f.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}) + "\n")
        f.flush()
        for line in f:
            cmd = json.loads(line)["execute"]
            got.append(cmd)
            reply = (answers.get(cmd) or [{"return": {}}]).pop(0)
            f.write(json.dumps({"event": "STOP", "timestamp": {}}) + "\n")
            f.write(json.dumps(reply) + "\n")
            f.flush()
            if cmd == "quit":
                break
        conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return got


def test_saving_asks_for_the_migration_waits_for_it_and_quits(tmp_path: Path) -> None:
    from kmatrix.backends.qmp import save_and_quit

    got = _fake_qmp(tmp_path / "q", {"query-migrate": [
        {"return": {"status": "active"}}, {"return": {"status": "completed"}}]})  # fmt: skip
    seconds = save_and_quit(tmp_path / "q", tmp_path / "state", timeout=10)
    assert seconds >= 0
    assert got == ["qmp_capabilities", "migrate-set-parameters", "migrate", "query-migrate",
                   "query-migrate", "quit"]  # fmt: skip


@pytest.mark.parametrize(
    ("answers", "said"),
    [
        ({"migrate": [{"error": {"desc": "no exec"}}]}, "QEMU refused migrate: no exec"),
        ({"query-migrate": [{"return": {"status": "failed", "error-desc": "EPIPE"}}]},
         "migration to .* failed: EPIPE"),
    ],
)  # fmt: skip
def test_a_failed_migration_is_an_infra_error_naming_the_fallback(
    tmp_path: Path, answers: dict[str, list[dict[str, Any]]], said: str
) -> None:
    from kmatrix.backends.qmp import save_and_quit

    got = _fake_qmp(tmp_path / "q", answers)
    with pytest.raises(InfraError, match=f"{said}.*oom.snapshot: false"):
        save_and_quit(tmp_path / "q", tmp_path / "state", timeout=10)
    assert got[-1] == "quit"  # QEMU is still asked to go
