"""A kernel as a developer has it after `make` and `make modules_install`, run as a full cell.

The build tree is laid out from a real Debian kernel package (bookworm's point-release 6.1,
pinned with `suites: [bookworm]`; cached after the first download): its vmlinuz becomes
arch/x86/boot/bzImage, its modules tree mod/lib/modules/RELEASE (what INSTALL_MOD_PATH=mod
gives) and its config .config. Then the matrix entry from the README boots it under QEMU.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from kmatrix.config import load_matrix, parse_matrix
from kmatrix.debian.archive import default_cache_dir
from kmatrix.debian.suites import Resolver
from kmatrix.guest.kernels import prepare_debian, prepare_local
from kmatrix.guest.userland import Userland
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.plan import cache_key, qemu_plan
from kmatrix.run.progress import Progress

pytestmark = pytest.mark.qemu

DEBIAN = "kernels:\n  - {name: src, suites: [bookworm], package: linux-image-cloud-amd64}\n"


def developer_tree(root: Path) -> tuple[Path, Path, Path]:
    """bzImage, installed modules tree and .config of a 'build', made from a Debian package."""
    matrix = parse_matrix("check_valid_until: false\n" + DEBIAN)
    cache = default_cache_dir()
    resolver = Resolver(matrix, cache)
    (k,) = matrix.kernels
    deb = prepare_debian(resolver.main_archive("amd64"), k, resolver.resolve(k), cache)
    assert deb.modules_dir is not None and deb.release is not None
    bzimage = root / "arch/x86/boot/bzImage"
    bzimage.parent.mkdir(parents=True)
    shutil.copyfile(deb.vmlinuz, bzimage)
    modules = root / "mod/lib/modules" / deb.release
    shutil.copytree(deb.modules_dir, modules, symlinks=True)
    # `make modules_install` links back into the source tree; the cache key must not follow it.
    (modules / "build").symlink_to(root)
    config = next((deb.vmlinuz.parent).glob("config-*"))
    shutil.copyfile(config, root / ".config")
    return bzimage, modules, root / ".config"


def test_local_build_runs_a_full_cell_and_is_cached_by_all_its_parts(tmp_path: Path) -> None:
    bzimage, modules, config = developer_tree(tmp_path / "linux")
    matrix_file = tmp_path / "matrix.yaml"
    matrix_file.write_text(
        "check_valid_until: false\n"
        "oom: {repeats: 1}\n"
        "kernels:\n"
        f"  - {{name: mine, path: {bzimage}, modules: {modules}, config: {config}}}\n"
    )
    opts = RunOptions(matrix_path=matrix_file, name="local", reports_dir=tmp_path / "reports",
                      jobs=1, force=True)  # fmt: skip
    log = io.StringIO()
    results = run_matrix(opts, Progress(log, live=False))
    (cell,) = results["cells"]
    assert cell["status"] == "ok", (cell["reason"], cell.get("console_tail"))
    assert cell["cached"] is False
    kernel = cell["kernel"]
    assert kernel["path"] == str(bzimage) and kernel["release"] == modules.name
    assert kernel["modules"] == str(modules) and kernel["config_file"] == str(config)
    assert kernel["config"]["CONFIG_MEMCG"] == "y"
    assert len(kernel["build_sha256"]) == 64 and kernel["modules_sha256"] != kernel["sha256"]
    # The probe ran in the booted kernel: the release it reports is the build's.
    assert cell["probe"]["release"] == modules.name
    assert {s["name"] for s in cell["scenarios"]} >= {"memfd-write", "tmpfile-over-shm-limit"}
    assert any(o["status"] == "ok" for o in cell["oom"])
    report = (tmp_path / "reports/local/report.md").read_text()
    assert "local build" in report
    again = run_matrix(RunOptions(matrix_path=matrix_file, name="local",
                                  reports_dir=tmp_path / "reports", jobs=1))  # fmt: skip
    assert again["cells"][0]["cached"] is True

    # The result cache key covers the modules tree and .config, not only the bzImage.
    m = load_matrix(matrix_file)
    (k,) = m.kernels
    userland = Userland("u", tmp_path, tmp_path, {})

    def key() -> str:
        return cache_key(qemu_plan(m, k, "tcg"), prepare_local(k), userland, "probe", "qemu 7.2")

    before = key()
    config.write_text(config.read_text() + "# CONFIG_LOCAL_TWEAK is not set\n")
    after_config = key()
    (modules / "kernel" / "kmatrix-rebuilt.txt").write_text("a module rebuilt\n")
    after_modules = key()
    assert len({before, after_config, after_modules}) == 3
