"""The pure-Python newc writer: read back by our reader and by GNU cpio."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kmatrix.guest.cpio import CpioWriter, read_cpio


def _archive(build: object) -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    build(w)  # type: ignore[operator]
    w.finish()
    return buf.getvalue()


def test_roundtrip_files_dirs_symlinks() -> None:
    def build(w: CpioWriter) -> None:
        w.add_file("init", b"#!/bin/sh\n", 0o755)
        w.add_file("a/b/c.bin", bytes(range(256)) * 3)
        w.add_symlink("bin/sh", "busybox")
        w.add_dir("a")  # already implied: must not be written twice

    entries = list(read_cpio(_archive(build)))
    names = [e.name for e in entries]
    assert names == ["init", "a", "a/b", "a/b/c.bin", "bin", "bin/sh"]
    by_name = {e.name: e for e in entries}
    assert by_name["a/b/c.bin"].data == bytes(range(256)) * 3
    assert stat.S_IMODE(by_name["init"].mode) == 0o755
    assert by_name["bin/sh"].is_symlink and by_name["bin/sh"].data == b"busybox"
    assert by_name["a"].is_dir


def test_every_member_is_4_byte_aligned() -> None:
    blob = _archive(lambda w: [w.add_file(f"f{i}", b"x" * i) for i in range(9)])
    assert len(blob) % 4 == 0
    assert [len(e.data) for e in read_cpio(blob)] == list(range(9))


def test_rejects_escaping_and_duplicate_names() -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(ValueError, match="bad archive member"):
        w.add_file("../etc/passwd", b"")
    w.add_file("x", b"")
    with pytest.raises(ValueError, match="duplicate"):
        w.add_file("x", b"")


def test_add_tree(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/python3.11").write_bytes(b"ELF")
    (tmp_path / "usr/bin/python3").symlink_to("python3.11")
    entries = {e.name: e for e in read_cpio(_archive(lambda w: w.add_tree(tmp_path)))}
    assert entries["usr/bin/python3.11"].data == b"ELF"
    assert entries["usr/bin/python3"].data == b"python3.11"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_lists_our_archive() -> None:
    blob = _archive(lambda w: (w.add_file("d/f", b"data"), w.add_symlink("l", "d/f")))
    out = subprocess.run(["cpio", "-it", "--quiet"], input=blob, capture_output=True, check=True)
    assert out.stdout.decode().split() == ["d", "d/f", "l"]
