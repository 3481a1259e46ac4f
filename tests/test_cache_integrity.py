"""A cache that cannot lie: every kind of cached artifact, edited or truncated, is refused.

Real files throughout: trees with manifests, the userland archive's digest (also checked
while an initrd is written), and result-cache entries with their console logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kmatrix.artifacts import (
    CacheCorrupted,
    file_digest,
    tree_problem,
    write_file_digest,
    write_manifest,
)
from kmatrix.backends.lifeline import guarded
from kmatrix.guest.userland import Userland, write_initrd
from kmatrix.results import cache as cellcache
from kmatrix.results.cache import CellCache
from kmatrix.results.schema import mark_incomplete

CELL = {
    "id": "6.1",
    "status": "ok",
    "scenarios": [{"name": "memfd-write", "metrics": {"VmRSS_delta": 4096}}],
    "oom": [{"name": "oom-memcg-v2", "status": "ok"}],
}


def _tree(root: Path) -> Path:
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1").write_bytes(b"kernel" * 1000)
    (root / "lib").mkdir()
    (root / "lib" / "virtio_blk.ko").write_bytes(b"module")
    (root / "lib" / "link").symlink_to("virtio_blk.ko")
    write_manifest(root)
    return root


def test_an_untouched_tree_matches_its_manifest(tmp_path: Path) -> None:
    assert tree_problem(_tree(tmp_path / "t")) is None


@pytest.mark.parametrize(
    "damage",
    ["truncate", "edit", "delete", "add", "relink", "no-manifest"],
)
def test_a_damaged_kernel_or_userland_tree_is_detected(tmp_path: Path, damage: str) -> None:
    root = _tree(tmp_path / "t")
    module = root / "lib" / "virtio_blk.ko"
    if damage == "truncate":
        (root / "boot" / "vmlinuz-6.1").write_bytes(b"kern")
    elif damage == "edit":
        module.write_bytes(b"moduLe")
    elif damage == "delete":
        module.unlink()
    elif damage == "add":
        (root / "lib" / "evil.ko").write_bytes(b"x")
    elif damage == "relink":
        (root / "lib" / "link").unlink()
        (root / "lib" / "link").symlink_to("../boot/vmlinuz-6.1")
    else:
        (root / ".kmatrix-manifest.json").write_text("{")
    assert tree_problem(root) is not None


def test_a_file_digest_catches_edit_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "userland.cpio"
    path.write_bytes(b"0707" * 10000)
    digest = write_file_digest(path)
    assert file_digest(path) == digest
    path.write_bytes(b"0707" * 9999)
    assert file_digest(path) is None
    (tmp_path / "userland.cpio.sha256").unlink()
    assert file_digest(path) is None  # no recorded digest: never trusted


def test_initrd_refuses_a_userland_archive_changed_after_its_check(tmp_path: Path) -> None:
    cpio = tmp_path / "userland.cpio"
    cpio.write_bytes(b"A" * 5000)
    userland = Userland("k", tmp_path, cpio, {}, write_file_digest(cpio))
    write_initrd(userland, b"cell", tmp_path / "ok.cpio")
    assert (tmp_path / "ok.cpio").read_bytes() == b"A" * 5000 + b"cell"
    cpio.write_bytes(b"A" * 4000)  # truncated between the check and the boot
    with pytest.raises(CacheCorrupted, match="changed after it was checked"):
        write_initrd(userland, b"cell", tmp_path / "bad.cpio")
    assert not (tmp_path / "bad.cpio").exists()
    assert file_digest(cpio) is None  # the next run rebuilds it


def _cached(tmp_path: Path) -> tuple[CellCache, Path]:
    cache = CellCache(tmp_path / "cells")
    console = tmp_path / "console.log"
    console.write_text("Linux version 6.1\n")
    cache.put("k", CELL, console)
    return cache, tmp_path / "cells" / "k.json"


def test_an_intact_cell_is_served(tmp_path: Path) -> None:
    cache, _ = _cached(tmp_path)
    hit = cache.get("k")
    assert hit is not None and hit[0] == CELL
    assert hit[1] is not None and hit[1].read_text() == "Linux version 6.1\n"


@pytest.mark.parametrize("damage", ["edit-metric", "truncate", "edit-console", "drop-console"])
def test_a_damaged_cell_cache_entry_is_never_served(tmp_path: Path, damage: str) -> None:
    cache, entry = _cached(tmp_path)
    if damage == "edit-metric":
        doc = json.loads(entry.read_text())
        doc["cell"]["scenarios"][0]["metrics"]["VmRSS_delta"] = 1
        entry.write_text(json.dumps(doc))
    elif damage == "truncate":
        entry.write_text(entry.read_text()[:40])
    elif damage == "edit-console":
        (tmp_path / "cells" / "k.console.log").write_text("Linux version 9.9\n")
    else:
        (tmp_path / "cells" / "k.console.log").unlink()
    assert cache.get("k") is None
    assert not entry.exists()  # dropped, so the cell is measured again


def test_an_incomplete_cell_is_not_ok_and_not_cached(tmp_path: Path) -> None:
    broken = CELL | {"oom": [{"name": "oom-memcg-v2", "status": "error", "reason": "hung"}]}
    marked = mark_incomplete(broken)
    assert marked["status"] == "incomplete" and "oom-memcg-v2" in marked["reason"]
    cache = CellCache(tmp_path / "cells")
    cache.put("k", broken, None)
    assert cache.get("k") is None
    # An entry cached by an older kmatrix with the error inside is not served either.
    cache.put("k2", CELL, None)
    entry = tmp_path / "cells" / "k2.json"
    doc = json.loads(entry.read_text())
    doc["cell"] = broken
    doc["sha256"] = cellcache._digest(broken)
    entry.write_text(json.dumps(doc))
    assert cache.get("k2") is None


def test_the_guard_kills_its_command_at_the_deadline() -> None:
    argv, fds = guarded(["sleep", "60"], 1.0)
    run = subprocess.run(argv, pass_fds=fds, timeout=20, check=False)
    assert run.returncode == 128 + 9


def test_the_guard_passes_exit_codes_and_signals_through() -> None:
    argv, fds = guarded([sys.executable, "-c", "import sys; sys.exit(3)"], 30)
    assert subprocess.run(argv, pass_fds=fds, timeout=20, check=False).returncode == 3
    argv, fds = guarded(["sh", "-c", "kill -9 $$"], 30)
    assert subprocess.run(argv, pass_fds=fds, timeout=20, check=False).returncode == -9
