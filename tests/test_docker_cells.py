"""Integration: the real probe in real containers on the local Docker engine.

Needs a running engine (`.ci/run` starts dockerd) and the bookworm guest userland, which is
fetched through the verified archive client and cached under ~/.cache/kmatrix.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from kmatrix.backends import docker as engine
from kmatrix.cells import docker as docker_cell
from kmatrix.config import DockerKernel, parse_matrix
from kmatrix.debian.archive import Archive, default_cache_dir, resolve_mirror
from kmatrix.guest.probe_image import ProbeImage, ensure_probe_image
from kmatrix.guest.userland import Userland, build_userland
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.plan import docker_plan
from kmatrix.run.progress import Progress

MIB = 1 << 20
SIZE = 32 * MIB
SHM = 64 * MIB
MEMORY = 384 * MIB

MATRIX = """
check_valid_until: false
require_docker: true
guest: {suite: bookworm}
probe: {size: 32M, cell_timeout: 300}
kernels:
  - {name: host, backend: docker, memory: 384M, shm_size: 64M}
"""

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def client(docker_client: Any) -> Any:
    return docker_client


@pytest.fixture(scope="module")
def userland() -> Userland:
    matrix = parse_matrix(MATRIX)
    cache = default_cache_dir()
    archive = Archive(resolve_mirror(None), cache, check_valid_until=False)
    return build_userland(archive, matrix.guest.suite, cache, log=lambda _: None)


@pytest.fixture(scope="module")
def image(client: Any, userland: Userland) -> ProbeImage:
    return ensure_probe_image(client, userland, default_cache_dir(), log=lambda _: None)


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory, image: ProbeImage) -> dict[str, Any]:
    """One full `invoke matrix` run of the host cell, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("docker")
    (tmp / "matrix.yaml").write_text(MATRIX)
    opts = RunOptions(matrix_path=tmp / "matrix.yaml", name="it", reports_dir=tmp, force=True)
    results = run_matrix(opts, Progress(io.StringIO(), live=False))
    assert "host (container)" in (tmp / "it" / "report.md").read_text()
    assert "KMX1 " in (tmp / "it" / "console" / "host.log").read_text()
    (only,) = results["cells"]
    assert only["status"] == "ok", only.get("reason")
    return dict(only) | {"_console": (tmp / "it" / "console" / "host.log").read_text()}


def _sc(cell: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(s for s in cell["scenarios"] if s["name"] == name))


def _near(value: int, expected: int, slack: int = 4 * MIB) -> bool:
    return expected - slack <= value <= expected + slack


def test_provenance_names_host_kernel_cgroup_and_engine(cell: dict[str, Any]) -> None:
    host_cgroup = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    assert cell["backend"] == "docker"
    assert cell["kernel"]["release"] == os.uname().release
    assert cell["engine"]["cgroup_version"] == host_cgroup
    assert cell["engine"]["name"] == "docker" and cell["engine"]["version"]
    assert cell["probe"]["cgroup"] == host_cgroup
    # Unprivileged: the cgroupfs is read-only, so the probe measures the container's cgroup.
    assert cell["probe"]["cgroup_mode"] == "shared"
    assert cell["probe"]["shm_size"] == SHM
    assert cell["probe"]["disk_fs"] not in (None, "tmpfs", "overlay")
    # The host's boot line is not the report's: not in the results, not in the console log.
    assert "cmdline" not in cell["probe"]
    with open("/proc/cmdline") as f:
        host_cmdline = f.read().strip()
    assert host_cmdline not in cell["_console"] and '"cmdline"' not in cell["_console"]
    assert cell["memory_bytes"] == MEMORY


def test_memfd_write_is_charged_to_the_container(cell: dict[str, Any]) -> None:
    m = _sc(cell, "memfd-write")["metrics"]
    assert _near(m["cgroup_shmem_delta"], SIZE)
    assert _near(m["cgroup_current_delta"], SIZE)
    assert m["VmRSS_delta"] < 2 * MIB and m["RssShmem_delta"] == 0


def test_memfd_passes_shm_size_where_tmpfile_hits_enospc(cell: dict[str, Any]) -> None:
    memfd = _sc(cell, "memfd-over-shm-limit")
    tmpfile = _sc(cell, "tmpfile-over-shm-limit")
    over = SHM + 32 * MIB
    assert memfd["size_bytes"] == tmpfile["size_bytes"] == over
    assert memfd["errno"] is None and memfd["detail"]["bytes_written"] == over
    assert _near(memfd["metrics"]["cgroup_shmem_delta"], over)
    assert tmpfile["errno"] == "ENOSPC"
    # What was written before ENOSPC (the whole /dev/shm) is charged to the container too.
    assert _near(tmpfile["metrics"]["cgroup_shmem_delta"], SHM)
    assert _near(tmpfile["metrics"]["fs_used_delta"], SHM)


def test_disk_tmpfile_is_page_cache_of_the_container(cell: dict[str, Any]) -> None:
    m = _sc(cell, "tmpfile-disk-write")["metrics"]
    assert _near(m["cgroup_file_delta"], SIZE)
    assert abs(m["cgroup_shmem_delta"]) < 2 * MIB


def _oom(cell: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(o for o in cell["oom"] if o["name"] == name))


def test_memcg_oom_kills_the_hog_not_the_memfd_holder_in_the_container(
    cell: dict[str, Any],
) -> None:
    """The memcg experiment of the host's cgroup version really runs, in the container's own
    memory cgroup, every repeat, and the memcg OOM killer never picks the holder first.

    Why the kernel makes that certain: a memcg OOM (mm/memcontrol.c mem_cgroup_out_of_memory
    -> mm/oom_kill.c out_of_memory) scans only the cgroup's tasks (mem_cgroup_scan_tasks)
    and kills the one with the highest oom_badness(task, totalpages), where totalpages is
    the cgroup's own limit (constrained_alloc: mem_cgroup_get_max) and badness = RSS
    (anon + file + shmem *mapped* pages) + swap entries + page tables + adj*totalpages/1000.
    The holder's memfd, filled by write() and never mapped, is charged to the cgroup (it
    counts towards the limit) but is in none of the holder's mm counters; every role has
    the same adj. So the holder scores only its interpreter's RSS (~15 MiB), while the hog,
    whose private anonymous pages are what pushes the cgroup over its limit, holds what the
    memfd (1/2 of the limit), the bystander (1/25) and the interpreters leave: >100 MiB of
    384. The first victim is the hog; the holder (and the harness, at adj 0 below the
    roles' raised adj) survives.
    """
    version = cell["probe"]["cgroup"]
    entry = _oom(cell, f"oom-memcg-{version}")
    assert entry["status"] == "ok", entry.get("reason")
    assert entry["repeats"] == 3 and len(entry["victims"]) == 3
    assert entry["victims_source"] == "probe" and entry["memcg"] == "container"
    for run in entry["runs"]:
        assert run["status"] == "ok" and run["outcome"] == "hog-died", run.get("error")
        assert run["sizes"]["limit"] == MEMORY  # the container's --memory
        assert run["victims"] and set(run["victims"]) <= {"holder", "bystander", "hog"}
        assert run["victims"][0] != "holder"
        assert run["victims"][0] == "hog" and run["exit"]["hog"] == "SIGKILL"
        assert "holder" not in run["exit"]  # still alive when the OOM was over
        assert run["cgroup"]["events"]["oom_kill"] >= 1  # this repeat's, per the cgroup
        assert run["cgroup"]["shmem_armed"] >= run["sizes"]["holder"]  # memfd charged here
        assert run["cgroup"]["restored"]  # memfd released before the next repeat
        adj = run["oom_score_adj"]
        assert adj["harness"] == -1000 or adj["roles"] > adj["harness"]
        assert run["predicted_victim"] == "hog"
    other = "v2" if version == "v1" else "v1"
    assert _oom(cell, f"oom-memcg-{other}")["status"] == "not available"


def test_probe_reads_the_containers_own_cgroup(client: Any, image: ProbeImage) -> None:
    """The directory the probe measures holds this container's limit: it is its cgroup."""
    code = (
        "import sys; sys.path.insert(0, '/probe'); import system, json;"
        "c = system.detect_cgroups('/sys/fs/cgroup');"
        "f = {'v1': 'memory.limit_in_bytes', 'v2': 'memory.max'}[c.version];"
        "print(json.dumps([c.own_dir, int(open(c.own_dir + '/' + f).read())]))"
    )
    spec = engine.ContainerSpec(
        image=image.tag,
        command=[],
        memory_bytes=200 * MIB,
        shm_size=SHM,
        pids_limit=64,
        name="kmatrix-test-cgroup",
    )
    config = engine.container_config(spec) | {"entrypoint": ["/usr/bin/python3", "-c", code]}
    run = engine.run_container(client, config, timeout=60)
    assert run.exit_code == 0, run.stderr
    own_dir, limit = json.loads(run.stdout)
    assert own_dir.startswith("/sys/fs/cgroup")
    assert limit == 200 * MIB


def test_global_oom_is_refused_not_run(
    image: ProbeImage, userland: Userland, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["memfd-write", "oom-global-memfd-unmapped", "oom-no-killable"]
    monkeypatch.setattr(docker_cell, "probe_names", lambda: names)
    matrix = parse_matrix(MATRIX.replace("probe: {", f"probe: {{scenarios: {names}, "))
    (kernel,) = matrix.kernels
    assert isinstance(kernel, DockerKernel)
    cell = docker_cell.run_docker_cell(
        docker_plan(matrix, kernel), userland, default_cache_dir(), tmp_path / "log"
    )
    assert cell["status"] == "ok", cell["reason"]
    assert [s["name"] for s in cell["scenarios"]] == ["memfd-write"]
    refused = {o["name"]: o for o in cell["oom"]}
    assert set(refused) == {"oom-global-memfd-unmapped", "oom-no-killable"}
    assert all(o["status"] == "refused" and o["repeats"] == 0 for o in refused.values())


def test_timeout_kills_and_removes_the_container(client: Any, image: ProbeImage) -> None:
    spec = engine.ContainerSpec(
        image=image.tag,
        command=["sleep", "60"],
        memory_bytes=64 * MIB,
        shm_size=SHM,
        pids_limit=16,
        name="kmatrix-test-timeout",
    )
    config = engine.container_config(spec) | {"entrypoint": ["/bin/busybox"]}
    run = engine.run_container(client, config, timeout=2)
    assert run.timed_out and run.duration_s < 30
    assert not client.containers.list(all=True, filters={"name": "kmatrix-test-timeout"})


def test_nothing_is_left_behind(client: Any, cell: dict[str, Any]) -> None:
    assert not client.containers.list(all=True, filters={"label": engine.LABEL})
    assert not client.volumes.list(filters={"label": engine.LABEL})


def test_unchanged_inputs_reuse_the_image(client: Any, userland: Userland) -> None:
    first = ensure_probe_image(client, userland, default_cache_dir(), log=lambda _: None)
    again = ensure_probe_image(client, userland, default_cache_dir(), log=lambda _: None)
    assert again.tag == first.tag and again.built is False


def test_kill_all_removes_a_running_container(client: Any, image: ProbeImage) -> None:
    """What Ctrl-C does: the waiting cell sees its container vanish and returns at once."""
    import threading

    spec = engine.ContainerSpec(
        image=image.tag,
        command=["sleep", "60"],
        memory_bytes=64 * MIB,
        shm_size=SHM,
        pids_limit=16,
        name="kmatrix-test-kill-all",
    )
    config = engine.container_config(spec) | {"entrypoint": ["/bin/busybox"]}
    runs: list[engine.ContainerRun] = []
    worker = threading.Thread(target=lambda: runs.append(engine.run_container(client, config, 60)))
    worker.start()
    deadline = time.monotonic() + 20
    while not client.containers.list(filters={"name": "kmatrix-test-kill-all"}):
        assert time.monotonic() < deadline, "container did not start"
        time.sleep(0.1)
    assert engine.kill_all() == 1
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert runs and runs[0].duration_s < 30 and runs[0].exit_code != 0
    assert not client.containers.list(all=True, filters={"name": "kmatrix-test-kill-all"})
