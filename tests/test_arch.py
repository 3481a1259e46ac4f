"""Per-architecture QEMU set-up (pure): the amd64 command line as it always was, arm64's own."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kmatrix.backends.qemu import AMD64, ARM64, QemuSpec, arch_for, build_argv
from kmatrix.cells.oom_guest import oom_spec
from kmatrix.config import parse_matrix
from kmatrix.errors import InfraError
from kmatrix.report.markdown import render_report
from kmatrix.results.view import cell_label
from kmatrix.run.plan import qemu_plan

SPEC = QemuSpec(
    vmlinuz=Path("/k/vmlinuz"),
    initrd=Path("/w/initrd"),
    console_log=Path("/w/console.log"),
    result_log=Path("/w/results.log"),
    memory_bytes=512 << 20,
    tcg_thread="single",
    disk=Path("/w/disk.img"),
    append="quiet",
)


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_amd64_argv() -> None:
    """Disks carry a serial the guest's init finds them by (the swap disk too)."""
    assert build_argv(SPEC) == [
        "qemu-system-x86_64", "-accel", "tcg,thread=single", "-cpu", "max,-erms,-fsrm,-smap",
        "-m", "512M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", "/k/vmlinuz", "-initrd", "/w/initrd",
        "-append", "console=ttyS0,115200 panic=-1 mitigations=off cryptomgr.notests quiet",
        "-serial", "file:/w/console.log", "-serial", "file:/w/results.log",
        "-drive", "file=/w/disk.img,format=raw,if=none,id=kmxdisk,cache=unsafe",
        "-device", "virtio-blk-pci,drive=kmxdisk,serial=kmxdisk",
    ]  # fmt: skip


def test_swap_disk_has_its_own_serial() -> None:
    argv = build_argv(replace(SPEC, swap=Path("/w/swap.img"), cpus=2))
    assert _after(argv, "-smp") == ["2"]
    assert _after(argv, "-device")[-1] == "virtio-blk-pci,drive=kmxswap,serial=kmxswap"
    assert "file=/w/swap.img,format=raw,if=none,id=kmxswap,cache=unsafe" in _after(argv, "-drive")


def test_arm64_argv_boots_the_virt_board_with_a_virtio_serial_result_port() -> None:
    argv = build_argv(QemuSpec(**{**SPEC.__dict__, "arch": ARM64}))
    assert argv[:3] == ["qemu-system-aarch64", "-machine", "virt"]
    assert _after(argv, "-cpu") == ["cortex-a72"]
    # Debian arm64 forces KPTI on under KASLR; kpti=0 spares TCG a TLB flush per syscall.
    assert _after(argv, "-append") == [
        "console=ttyAMA0 panic=-1 mitigations=off cryptomgr.notests kpti=0 quiet"
    ]
    # One UART (the console); the results travel over a named virtio-serial port.
    assert _after(argv, "-serial") == ["file:/w/console.log"]
    assert _after(argv, "-chardev") == ["file,id=kmxresult,path=/w/results.log"]
    assert _after(argv, "-device") == [
        "virtio-serial-pci",
        "virtserialport,chardev=kmxresult,name=kmatrix",
        "virtio-blk-pci,drive=kmxdisk,serial=kmxdisk",
    ]
    assert ARM64.result_device == "port:kmatrix"
    assert "virtio_console" in ARM64.guest_modules


def test_a_comma_in_the_result_path_is_escaped_only_inside_option_lists() -> None:
    odd = Path("/w/a,b/results.log")
    arm = build_argv(QemuSpec(**{**SPEC.__dict__, "arch": ARM64, "result_log": odd}))
    assert _after(arm, "-chardev") == ["file,id=kmxresult,path=/w/a,,b/results.log"]
    x86 = build_argv(QemuSpec(**{**SPEC.__dict__, "result_log": odd}))
    assert _after(x86, "-serial")[1] == "file:/w/a,b/results.log"


def test_tcg_runs_vcpus_on_the_threads_the_spec_says() -> None:
    multi = build_argv(replace(SPEC, cpus=2, tcg_thread="multi"))
    assert _after(multi, "-accel") == ["tcg,thread=multi"]
    assert _after(build_argv(replace(SPEC, cpus=2)), "-accel") == ["tcg,thread=single"]


def test_the_oom_boots_run_their_vcpus_as_the_plan_says() -> None:
    """The OOM boots (a restored boot copies the saving boot's spec) take guest.tcg_thread
    from the plan. QemuSpec has no default for it, so mypy --strict holds every other
    constructor (the accounting boot's) to passing one."""
    text = "kernels:\n  - {name: k, suite: bookworm, package: p}\n"
    for thread in ("single", "multi"):
        matrix = parse_matrix(f"guest: {{tcg_thread: {thread}}}\n" + text)
        plan = qemu_plan(matrix, matrix.kernels[0], "tcg")  # type: ignore[arg-type]
        oom = oom_spec(plan, Path("/w/vmlinux"), Path("/w/initrd"), Path("/w"), "saved")
        assert _after(build_argv(oom), "-accel") == [f"tcg,thread={thread}"]


def test_kvm_uses_the_host_cpu() -> None:
    argv = build_argv(QemuSpec(**{**SPEC.__dict__, "accel": "kvm"}))
    assert _after(argv, "-accel") == ["kvm"] and _after(argv, "-cpu") == ["host"]


def test_arch_lookup() -> None:
    assert arch_for("amd64") is AMD64 and arch_for("arm64") is ARM64
    with pytest.raises(InfraError, match="riscv64"):
        arch_for("riscv64")


def test_matrix_arch_defaults_to_amd64() -> None:
    m = parse_matrix(
        "kernels:\n"
        "  - {name: a, suite: trixie, package: linux-image-cloud-amd64}\n"
        "  - {name: b, suite: trixie, package: linux-image-cloud-arm64, arch: arm64}\n"
    )
    assert [k.arch for k in m.kernels] == ["amd64", "arm64"]


def _cell(cid: str, arch: str | None, backend: str = "qemu") -> dict[str, object]:
    cell: dict[str, object] = {"id": cid, "backend": backend, "status": "ok", "scenarios": []}
    if arch:
        cell["arch"] = arch
    return cell


def test_column_labels_name_a_foreign_architecture() -> None:
    assert cell_label(_cell("6.12", "amd64")) == "6.12"
    assert cell_label(_cell("6.12", "arm64")) == "6.12 (arm64)"
    assert cell_label(_cell("6.12-arm64", "arm64")) == "6.12-arm64"
    assert cell_label(_cell("host", None, "docker")) == "host (container)"


def test_report_provenance_has_an_arch_row_and_the_arm64_qemu() -> None:
    results = {
        "schema_version": 1,
        "run": {
            "name": "t",
            "host": {"machine": "x86_64", "qemu": "QEMU emulator version 7.2.22",
                     "qemu_arm64": "QEMU emulator version 7.2.23"},
            "guest": {"suite": "bookworm", "packages": {"libc6": "1"},
                      "packages_arm64": {"libc6": "2"}},
        },
        "cells": [_cell("6.12", "amd64"), _cell("6.12", "arm64"), _cell("host", None, "docker")],
    }  # fmt: skip
    text = render_report(results)
    assert "| arch " in text and "| amd64 " in text and "| arm64 " in text and "x86_64" in text
    assert "QEMU (arm64) 7.2.23" in text
    assert "Guest userland (bookworm, arm64): libc6 2." in text
