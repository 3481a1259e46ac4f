"""Unit tests for the runner image's inputs and the runner container's settings (no engine)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kmatrix.config import parse_matrix
from kmatrix.errors import UserError
from kmatrix.run import in_docker, runner_image
from kmatrix.run.matrix_in_docker import plan_cells

MIB = 1 << 20

MATRIX = """
guest: {memory: 256M, shm_size: 32M, disk_size: 64M}
probe: {size: 8M, scenarios: [memfd-write], cell_timeout: 120}
oom: {experiments: [], memory: 192M}
kernels:
  - {name: "6.1", suite: bookworm, package: linux-image-cloud-amd64}
  - {name: big, suite: bookworm, package: linux-image-cloud-amd64, memory: 1G}
  - {name: mine, path: /tmp/bzImage}
  - {name: host, backend: docker, memory: 512M}
"""


def spec(**changes: object) -> in_docker.RunnerSpec:
    base = in_docker.RunnerSpec(
        image="kmatrix-runner:0123456789abcdef",
        command=in_docker.cell_command("6.1", "cell.json"),
        cache_dir=Path("/home/u/.cache/kmatrix"),
        out_dir=Path("/tmp/out"),
        matrix_file=Path("/tmp/m/matrix.yaml"),
        mirror="http://mirror.invalid/debian",
        memory_bytes=1280 * MIB,
        user="1000:1000",
        name="kmatrix-runner-6.1-abcd",
    )
    return in_docker.RunnerSpec(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def test_config_mounts_cache_output_and_matrix() -> None:
    config = in_docker.runner_config(spec())
    assert config["volumes"] == {
        "/home/u/.cache/kmatrix": {"bind": "/cache", "mode": "rw"},
        "/tmp/out": {"bind": "/out", "mode": "rw"},
        "/tmp/m/matrix.yaml": {"bind": "/kmatrix/matrix.yaml", "mode": "ro"},
    }
    assert config["environment"]["KMATRIX_CACHE"] == "/cache"
    assert config["environment"]["KMATRIX_MIRROR"] == "http://mirror.invalid/debian"
    assert config["command"] == [
        "cell", "--kernel", "6.1", "--matrix-file", "/kmatrix/matrix.yaml",
        "--output", "/out/cell.json",
    ]  # fmt: skip


def test_config_limits_and_no_privileges() -> None:
    config = in_docker.runner_config(spec())
    assert config["mem_limit"] == config["memswap_limit"] == 1280 * MIB
    assert config["pids_limit"] == in_docker.PIDS_LIMIT
    assert config["cap_drop"] == ["ALL"]
    assert config["privileged"] is False
    assert config["user"] == "1000:1000"
    assert config["labels"]["kmatrix"] == "1"


def test_kvm_only_when_given() -> None:
    assert "devices" not in in_docker.runner_config(spec())
    assert "group_add" not in in_docker.runner_config(spec())
    config = in_docker.runner_config(spec(kvm_gid=0))  # gid 0 (root) is a group like any other
    assert config["devices"] == ["/dev/kvm:/dev/kvm:rwm"]
    assert config["group_add"] == ["0"]


def test_env_cannot_override_cache_or_mirror() -> None:
    env = {"KMATRIX_MIRROR": "http://other.invalid", "http_proxy": "http://proxy:3128"}
    config = in_docker.runner_config(spec(env=env))
    assert config["environment"]["KMATRIX_MIRROR"] == "http://mirror.invalid/debian"
    assert config["environment"]["http_proxy"] == "http://proxy:3128"


def test_proxy_env_picks_only_proxies() -> None:
    assert in_docker.proxy_env({"http_proxy": "x", "HOME": "/root", "NO_PROXY": ""}) == {
        "http_proxy": "x"
    }


def test_memory_and_timeout_follow_the_matrix() -> None:
    matrix = parse_matrix(MATRIX)
    small, big = matrix.kernels[0], matrix.kernels[1]
    # The accounting boot beside an OOM boot (RUNNER_SLOTS = 2 guests at once).
    assert in_docker.runner_memory(matrix, small) == (256 + 192) * MIB + in_docker.RUNNER_OVERHEAD
    assert in_docker.runner_memory(matrix, big) == (1024 + 192) * MIB + in_docker.RUNNER_OVERHEAD
    # No OOM experiments: the download allowance plus the accounting boot.
    assert in_docker.runner_timeout(matrix) == in_docker.DOWNLOAD_ALLOWANCE_S + 120
    with_oom = parse_matrix(MATRIX.replace("experiments: []", "experiments: all"))
    assert in_docker.runner_timeout(with_oom) > in_docker.runner_timeout(matrix) + 300


def test_local_builds_and_docker_cells_are_refused() -> None:
    matrix = parse_matrix(MATRIX)
    in_docker.check_runnable(matrix.kernels[0])
    with pytest.raises(UserError, match="local build"):
        in_docker.check_runnable(matrix.kernels[2])
    with pytest.raises(UserError, match="docker cell"):
        in_docker.check_runnable(matrix.kernels[3])


def test_requirements_are_the_runtime_dependencies() -> None:
    text = b'[project]\ndependencies = ["invoke>=2.2", "docker>=7.0"]\n'
    text += b'[project.optional-dependencies]\ndev = ["ruff"]\n'
    assert runner_image.project_requirements(text) == ["invoke>=2.2", "docker>=7.0"]


def test_pip_download_targets_the_image_interpreter() -> None:
    argv = runner_image.pip_download_argv("py", Path("/w/req.txt"), Path("/w"))
    assert argv[:4] == ["py", "-m", "pip", "download"]
    assert "--only-binary=:all:" in argv
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert "manylinux_2_36_x86_64" in argv
    assert argv[-4:] == ["-d", "/w", "-r", "/w/req.txt"]


def test_debootstrap_base_tag_ignores_the_mirror() -> None:
    argv = runner_image.debootstrap_argv(Path("/r"), "http://m.invalid/debian")
    assert argv == [
        "debootstrap", "--variant=minbase", "--arch=amd64", "bookworm", "/r",
        "http://m.invalid/debian",
    ]  # fmt: skip
    assert runner_image.base_tag().startswith("kmatrix-runner-base:")
    assert runner_image.base_tag() != runner_image.base_tag("trixie")


def test_content_hash_changes_with_each_input() -> None:
    args = ("sha256:aa", b"FROM x", {"src/a.py": b"1"}, {"w.whl": "00"})
    h = runner_image.content_hash(*args)
    assert h == runner_image.content_hash(*args)
    assert h != runner_image.content_hash("sha256:bb", *args[1:])
    assert h != runner_image.content_hash(args[0], b"FROM y", *args[2:])
    assert h != runner_image.content_hash(*args[:2], {"src/a.py": b"2"}, args[3])
    assert h != runner_image.content_hash(*args[:3], {"w.whl": "01"})
    # Pinned: the same inputs keep their tag, so images already built are reused.
    project = {"src/a.py": b"1", "tasks.py": b"t"}
    wheels = {"w.whl": "00", "a.whl": "ff"}
    assert runner_image.content_hash("sha256:aa", b"FROM x", project, wheels) == "37dfee499505de58"


def test_build_args_carry_mirror_and_proxies() -> None:
    args = runner_image.build_args("b:1", "http://m.invalid/debian/", {"https_proxy": "p"})
    assert args == {
        "BASE": "b:1",
        "MIRROR": "http://m.invalid/debian",
        "SUITE": "bookworm",
        "https_proxy": "p",
    }


def test_project_files_skip_caches(tmp_path: Path) -> None:
    (tmp_path / "src/kmatrix/__pycache__").mkdir(parents=True)
    (tmp_path / "src/kmatrix/a.py").write_text("x")
    (tmp_path / "src/kmatrix/__pycache__/a.cpython-311.pyc").write_text("x")
    (tmp_path / "tasks.py").write_text("t")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests/test_x.py").write_text("t")
    assert sorted(runner_image.project_files(tmp_path)) == ["src/kmatrix/a.py", "tasks.py"]


def test_repository_names_no_mirror_host() -> None:
    """The mirror comes from the host's apt sources at build time, never from the repository."""
    dockerfile = runner_image.DOCKERFILE.read_text()
    assert "deb.debian.org" not in dockerfile
    assert "${MIRROR}" in dockerfile


def test_cli_refuses_an_unknown_runtime() -> None:
    """`invoke cell --runtime` is validated before anything runs (exit 2, the choices named)."""
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "cell", "--kernel", "x", "--output", "/dev/null",
         "--runtime", "podman"],
        cwd=runner_image.ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--runtime 'podman': use one of host, docker" in proc.stderr


def test_reports_dir_is_mounted_over_the_images_reports() -> None:
    config = in_docker.runner_config(spec(reports_dir=Path("/p/reports")))
    assert config["volumes"]["/p/reports"] == {"bind": "/src/reports", "mode": "rw"}


def test_matrix_runtime_docker_plans_qemu_cells_into_the_runner(tmp_path: Path) -> None:
    kernels = parse_matrix(MATRIX).kernels
    plan = plan_cells(kernels, tmp_path)
    # Debian kernels under QEMU in the runner; a local build and a docker cell on the host.
    assert [(c.kernel, c.where) for c in plan] == [
        ("6.1", "runner"), ("big", "runner"), ("mine", "host"), ("host", "host")
    ]  # fmt: skip
    assert [c.output for c in plan] == [tmp_path / f"{k.name}.json" for k in kernels]


def test_build_context_holds_dockerfile_wheels_and_project(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "b.whl").write_bytes(b"bb")
    (wheels / "a.whl").write_bytes(b"aa")
    (wheels / ".complete").touch()  # bookkeeping: neither in the context nor in the hash
    project = {"tasks.py": b"t", "images/guest/init": b"#!/bin/sh\n"}
    runner_image.write_context(tmp_path / "ctx.tar", b"FROM x", wheels, project)
    with tarfile.open(tmp_path / "ctx.tar") as tf:
        members = [(m.name, m.mode) for m in tf]
    assert [name for name, _ in members] == [
        "Dockerfile", "wheels/a.whl", "wheels/b.whl", "project/images/guest/init",
        "project/tasks.py",
    ]  # fmt: skip
    assert dict(members)["project/images/guest/init"] == 0o755
    assert dict(members)["project/tasks.py"] == 0o644
    assert set(runner_image.wheel_set(wheels)) == {"a.whl", "b.whl"}
