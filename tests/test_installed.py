"""The installed tool: the built wheel in a fresh venv, run from an empty directory.

Proves that nothing needs a checkout: the ``kmatrix`` command has the tasks of tasks.py, the
probe and the guest's init come from the wheel's package data, and reports/ is written in the
directory it runs in. Boots one real kernel (6.1, one scenario, no OOM experiments).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("bench", "cell", "check", "ci-matrix", "diff", "images", "matrix", "merge", "report")

MATRIX = """
check_valid_until: false
guest: {suite: bookworm, memory: 256M, shm_size: 32M, disk_size: 64M}
probe: {size: 16M, scenarios: [memfd-write], repeats: 1, cell_timeout: 600}
oom: {experiments: []}
kernels:
  - {name: "6.1", suite: bookworm, package: linux-image-cloud-amd64}
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` would install, built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)]
    subprocess.run(argv, check=True, timeout=600, cwd=out)
    (built,) = out.glob("kmatrix-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv with only the wheel installed; its dependencies are this interpreter's.

    The dependencies are reached through a .pth line rather than downloaded (offline), and a
    .pth line does not run the editable install's own hooks: kmatrix can only come from the wheel.
    """
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "kmatrix-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    return venv


def test_wheel_carries_probes_and_images(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for probe in (ROOT / "probes").glob("*.py"):
        assert f"kmatrix/data/probes/{probe.name}" in names
    assert "kmatrix/data/images/guest/init" in names
    assert "kmatrix/data/images/guest/packages.txt" in names
    entry = zipfile.ZipFile(wheel).read("kmatrix-0.1.0.dist-info/entry_points.txt").decode()
    assert "kmatrix = kmatrix.cli:main" in entry


def test_list_shows_the_tasks(venv: Path, tmp_path: Path) -> None:
    listed = subprocess.run(
        [venv / "bin" / "kmatrix", "--list"], cwd=tmp_path, capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout  # fmt: skip
    shown = {line.split()[0] for line in listed.splitlines() if line.startswith("  ")}
    assert set(TASKS) <= shown


def test_data_comes_from_the_package(venv: Path, tmp_path: Path) -> None:
    code = "from kmatrix.resources import data_root; print(data_root())"
    where = subprocess.run(
        [venv / "bin" / "python", "-c", code], cwd=tmp_path, capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv) and Path(where, "probes", "probe.py").is_file()


def test_runtime_docker_outside_a_checkout_says_what_to_do(venv: Path, tmp_path: Path) -> None:
    (tmp_path / "my.yaml").write_text(MATRIX)
    argv = [venv / "bin" / "kmatrix", "matrix", "--matrix-file", "my.yaml", "--runtime", "docker"]
    run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "from a clone of the kmatrix repository" in run.stderr
    assert not (tmp_path / "reports").exists()


@pytest.mark.qemu
def test_one_kernel_matrix_from_an_empty_directory(venv: Path, tmp_path: Path) -> None:
    (tmp_path / "my.yaml").write_text(MATRIX)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [venv / "bin" / "kmatrix", "matrix", "--matrix-file", "my.yaml", "--force"]
    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads((tmp_path / "reports" / "latest" / "results.json").read_text())
    (cell,) = results["cells"]
    assert cell["status"] == "ok" and cell["cached"] is False
    (memfd,) = cell["scenarios"]
    assert memfd["name"] == "memfd-write"
    assert memfd["metrics"]["meminfo_Shmem_delta"] >= 0.9 * 16 * (1 << 20)
    assert (tmp_path / "reports" / "latest" / "report.md").read_text().startswith("# kmatrix")
