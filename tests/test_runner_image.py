"""Integration: build the runner image and run one real cell with `--runtime docker` in it.

Needs a running engine (`.ci/run` starts dockerd), the host's Debian mirror, and root the
first time when `debian:bookworm-slim` cannot be pulled (the base is then made with
debootstrap). Cold, about 2-3 minutes (debootstrap ~50 s, apt install of QEMU ~30 s, wheels
~20 s, venv ~30 s) plus one TCG boot (~30 s); warm, the image is found by its tag (a few
seconds when only project files changed) and the cell boot is what remains.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from kmatrix.debian.archive import default_cache_dir, resolve_mirror
from kmatrix.errors import InfraError
from kmatrix.run import in_docker
from kmatrix.run.matrix_in_docker import run_matrix_in_docker
from kmatrix.run.runner_image import RunnerImage, ensure_runner_image

pytestmark = pytest.mark.docker

MATRIX = """
check_valid_until: false
accel: tcg
guest: {suite: bookworm, memory: 256M, shm_size: 32M, disk_size: 64M}
probe: {size: 8M, scenarios: [memfd-write], cell_timeout: 300}
oom: {experiments: []}
kernels:
  - {name: runner-6.1, suite: bookworm, package: linux-image-cloud-amd64}
"""


@pytest.fixture(scope="module")
def client(docker_client: Any) -> Any:
    return docker_client


@pytest.fixture(scope="module")
def image(client: Any) -> RunnerImage:
    start = time.monotonic()
    built = ensure_runner_image(client, resolve_mirror(None), default_cache_dir(), log=print)
    print(f"runner image {built.tag} FROM {built.base}: {time.monotonic() - start:.0f} s")
    return built


def _in_image(client: Any, image: str, argv: list[str]) -> str:
    out = client.containers.run(image, entrypoint=argv[:1], command=argv[1:], remove=True)
    return bytes(out).decode().strip()


def _leftovers(client: Any) -> list[str]:
    found = client.containers.list(all=True, filters={"label": "kmatrix.role=runner"})
    return [c.name for c in found]


def test_one_cell_runs_in_the_runner_image(client: Any, image: RunnerImage, tmp_path: Path) -> None:
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(MATRIX)
    output = tmp_path / "out" / "cell.json"
    reports = tmp_path / "reports"
    code = in_docker.run_cell_in_docker(
        matrix, "runner-6.1", output, force=True, reports_dir=reports, log=print
    )
    assert code == 0
    results = json.loads(output.read_text())
    (cell,) = results["cells"]
    assert cell["status"] == "ok", cell.get("reason")
    assert cell["accel"] == "tcg"
    # Alone, the runner's two QEMUs are all the machine runs (KMATRIX_MACHINE_QEMUS).
    assert cell["qemu_slots"] == in_docker.RUNNER_SLOTS
    assert [s["name"] for s in cell["scenarios"]] == ["memfd-write"]
    # QEMU and Python are the image's, not the host's.
    qemu = _in_image(client, image.tag, ["qemu-system-x86_64", "--version"]).splitlines()[0]
    assert results["run"]["host"]["qemu"] == qemu.strip()
    python = _in_image(
        client, image.tag, ["python3", "-c", "import platform as p;print(p.python_version())"]
    )
    assert results["run"]["host"]["python"] == python
    # The cell's console log and report came back through the mount.
    assert (reports / "cell-runner-6.1" / "console" / "runner-6.1.log").stat().st_size > 0
    assert (reports / "cell-runner-6.1" / "report.md").exists()
    assert _leftovers(client) == []


def test_matrix_runtime_docker_runs_every_qemu_cell_in_the_image(
    client: Any, image: RunnerImage, tmp_path: Path
) -> None:
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(MATRIX)
    reports = tmp_path / "reports"
    results = run_matrix_in_docker(matrix, "in-docker", force=True, reports_dir=reports)
    (cell,) = results["cells"]
    assert cell["id"] == "runner-6.1" and cell["status"] == "ok", cell.get("reason")
    assert cell["cached"] is False
    assert cell["qemu_slots"] == in_docker.RUNNER_SLOTS  # one runner at once
    qemu = _in_image(client, image.tag, ["qemu-system-x86_64", "--version"]).splitlines()[0]
    assert results["run"]["host"]["qemu"] == qemu.strip()  # the image's QEMU, not the host's
    assert json.loads((reports / "in-docker" / "results.json").read_text()) == results
    assert (reports / "in-docker" / "report.md").read_text().startswith("# kmatrix report")
    assert _leftovers(client) == []


def test_runner_container_is_removed_after_a_timeout(
    client: Any, image: RunnerImage, tmp_path: Path
) -> None:
    spec = in_docker.RunnerSpec(
        image=image.tag,
        command=["600"],
        cache_dir=tmp_path,
        out_dir=tmp_path,
        matrix_file=tmp_path,
        mirror="http://unused.invalid",
        memory_bytes=256 << 20,
        user="0:0",
        name=f"kmatrix-runner-timeout-{time.monotonic_ns()}",
    )
    config = in_docker.runner_config(spec) | {"entrypoint": ["sleep"]}
    start = time.monotonic()
    with pytest.raises(InfraError, match="did not finish within 3 s"):
        in_docker.run_runner(client, config, timeout=3, log=print)
    assert time.monotonic() - start < 60
    assert _leftovers(client) == []
