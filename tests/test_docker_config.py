"""Docker backend without an engine: container settings, safety checks, missing engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmatrix.backends import docker as engine
from kmatrix.cells import docker as docker_cell
from kmatrix.config import DockerKernel, parse_matrix
from kmatrix.errors import UserError
from kmatrix.guest.probe_image import content_hash, image_tag
from kmatrix.guest.userland import Userland
from kmatrix.results.schema import ProbeOutput
from kmatrix.run.plan import docker_plan

MIB = 1 << 20

MATRIX = """
kernels:
  - {name: host, backend: docker, memory: 512M, shm_size: 64M, pids_limit: 128}
"""


def _spec(**kw: object) -> engine.ContainerSpec:
    args: dict[str, object] = {
        "image": "kmatrix-probe:abc",
        "command": ["--list"],
        "memory_bytes": 512 * MIB,
        "shm_size": 64 * MIB,
        "pids_limit": 256,
        "name": "kmatrix-host-1",
    }
    args.update(kw)
    return engine.ContainerSpec(**args)  # type: ignore[arg-type]


def test_container_config_has_every_limit_explicit() -> None:
    cfg = engine.container_config(_spec(disk_volume="vol"))
    assert cfg["mem_limit"] == cfg["memswap_limit"] == 512 * MIB
    assert cfg["shm_size"] == 64 * MIB
    assert cfg["pids_limit"] == 256
    assert cfg["network_mode"] == "none"
    assert cfg["cap_drop"] == ["ALL"]
    assert cfg["privileged"] is False
    assert "no-new-privileges" in cfg["security_opt"]
    assert cfg["log_config"]["type"] == "json-file"
    assert cfg["labels"]["kmatrix"] == "1"
    assert cfg["volumes"] == {"vol": {"bind": "/mnt/disk", "mode": "rw"}}
    assert "volumes" not in engine.container_config(_spec())


def test_memory_limit_must_stay_well_below_available() -> None:
    engine.check_memory(512 * MIB, 4096 * MIB, "kernels: host")
    with pytest.raises(UserError, match=r"kernels: host: memory 3000 MiB .* lower memory:"):
        engine.check_memory(3000 * MIB, 4096 * MIB, "kernels: host")
    with pytest.raises(UserError, match="explicit memory"):
        engine.check_memory(0, None, "kernels: host")


def test_limits_must_leave_room_for_the_over_shm_scenarios() -> None:
    docker_cell.check_limits(512 * MIB, 64 * MIB, 64 * MIB, "kernels: host")
    with pytest.raises(UserError, match="too small for shm_size 256 MiB"):
        docker_cell.check_limits(256 * MIB, 256 * MIB, 64 * MIB, "kernels: host")


def test_host_mem_available() -> None:
    assert engine.host_mem_available("MemTotal: 10 kB\nMemAvailable:  2048 kB\n") == 2 * MIB
    assert engine.host_mem_available("MemTotal: 10 kB\n") is None


def test_cgroup_version_from_docker_info() -> None:
    assert engine.parse_cgroup_version({"CgroupVersion": "2"}) == "v2"
    assert engine.parse_cgroup_version({"CgroupVersion": "1"}) == "v1"
    assert engine.parse_cgroup_version({}) == "v1"  # engines before 20.10


def test_global_oom_experiments_are_refused() -> None:
    known = [
        "anon-private",
        "memfd-write",
        "oom-global-memfd-unmapped",
        "oom-memcg-v2",
        "oom-memcg-v2-group",
        "oom-no-killable",
    ]
    run, refused = docker_cell.split_names("all", known)
    assert run == ["anon-private", "memfd-write", "oom-memcg-v2", "oom-memcg-v2-group"]
    assert refused == ["oom-global-memfd-unmapped", "oom-no-killable"]
    run, refused = docker_cell.split_names(["oom-global-memfd-unmapped", "memfd-write"], known)
    assert (run, refused) == (["memfd-write"], ["oom-global-memfd-unmapped"])
    rec = docker_cell.refused_record("oom-no-killable")
    assert rec["status"] == "refused" and rec["repeats"] == 0 and rec["victims"] == []
    assert rec["panic"] is None  # not measured, not "no panic"
    assert "host" in rec["reason"]


def test_probe_command() -> None:
    argv = docker_cell.probe_command(["memfd-write", "anon-private"], 64 * MIB, 120)
    assert argv[argv.index("--scenarios") + 1] == "memfd-write,anon-private"
    assert argv[argv.index("--size-mib") + 1] == "64"
    assert argv[argv.index("--disk-dir") + 1] == "/mnt/disk"


def test_content_hash_changes_with_every_input() -> None:
    base = content_hash("u1", {"probe.py": b"a"}, b"FROM scratch")
    assert base == content_hash("u1", {"probe.py": b"a"}, b"FROM scratch")
    assert base != content_hash("u2", {"probe.py": b"a"}, b"FROM scratch")
    assert base != content_hash("u1", {"probe.py": b"b"}, b"FROM scratch")
    assert base != content_hash("u1", {"probe.py": b"a", "x.py": b""}, b"FROM scratch")
    assert base != content_hash("u1", {"probe.py": b"a"}, b"FROM scratch\n")
    # Pinned: the same inputs keep their tag, so images already built are reused.
    probe = {"probe.py": b"a", "b/x.py": b"zz"}
    assert content_hash("u1", probe, b"FROM scratch") == "687bd56050e2e03c"
    assert image_tag(base) == f"kmatrix-probe:{base}"


def test_classify() -> None:
    done = ProbeOutput(hello={"type": "hello"}, done={"type": "done"})
    assert docker_cell.classify(engine.ContainerRun(exit_code=0), done) == ("ok", "")
    status, reason = docker_cell.classify(engine.ContainerRun(timed_out=True), ProbeOutput())
    assert status == "timeout"
    status, reason = docker_cell.classify(engine.ContainerRun(oom_killed=True), ProbeOutput())
    assert status == "error" and "OOM-killed" in reason
    run = engine.ContainerRun(exit_code=1, stderr="Traceback\nValueError: boom\n")
    assert docker_cell.classify(run, ProbeOutput()) == (
        "error",
        "probe exited 1 without finishing: ValueError: boom",
    )


def test_config_docker_fields() -> None:
    m = parse_matrix(MATRIX)
    assert m.kernels[0].pids_limit == 128 and m.require_docker is False
    with pytest.raises(UserError, match="pids_limit"):
        parse_matrix(
            "kernels:\n  - {name: a, suite: bookworm, package: linux-image-cloud-amd64,"
            " pids_limit: 100}\n"
        )


# --- no engine ---------------------------------------------------------------------------


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """DOCKER_HOST at a socket that does not exist."""
    sock = tmp_path / "no-such-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
    monkeypatch.delenv(docker_cell.REQUIRE_ENV, raising=False)
    return sock


def test_connect_names_the_socket_and_how_to_start_an_engine(no_engine: Path) -> None:
    with pytest.raises(engine.EngineUnavailable) as info:
        engine.connect(timeout=5)
    assert str(no_engine) in str(info.value)
    assert "systemctl start docker" in str(info.value)
    assert "dockerd" in str(info.value)


def _cell(tmp_path: Path, text: str = MATRIX) -> dict[str, object]:
    matrix = parse_matrix(text)
    userland = Userland("none", tmp_path / "root", tmp_path / "u.cpio", {})
    (kernel,) = matrix.kernels
    assert isinstance(kernel, DockerKernel)
    return docker_cell.run_docker_cell(
        docker_plan(matrix, kernel), userland, tmp_path, tmp_path / "host.log", log=lambda _: None
    )


def test_missing_engine_skips_the_cell(no_engine: Path, tmp_path: Path) -> None:
    cell = _cell(tmp_path)
    assert cell["status"] == "skipped"
    assert cell["backend"] == "docker"
    assert "systemctl start docker" in str(cell["reason"])
    assert docker_cell.REQUIRE_ENV in str(cell["reason"])


def test_missing_engine_is_an_error_when_required(
    no_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _cell(tmp_path, "require_docker: true\n" + MATRIX)["status"] == "error"
    monkeypatch.setenv(docker_cell.REQUIRE_ENV, "1")
    cell = _cell(tmp_path)
    assert cell["status"] == "error"
    assert "no Docker engine answers" in str(cell["reason"])


def test_failed_oom_container_keeps_accounting_and_records_the_error() -> None:
    cell = docker_cell.new_cell("host", "docker")
    good = ProbeOutput(hello={"type": "hello"}, done={"type": "done"})
    failed = engine.ContainerRun(exit_code=1, stderr="PermissionError: denied\n")
    docker_cell._fill(
        cell,
        [
            (["memfd-write"], engine.ContainerRun(exit_code=0), good),
            (["oom-memcg-v2"], failed, ProbeOutput(hello={"type": "hello"})),
        ],
    )
    assert cell["status"] == "ok"
    (rec,) = cell["oom"]
    assert rec["name"] == "oom-memcg-v2" and rec["status"] == "error"
    assert "PermissionError" in rec["reason"]
