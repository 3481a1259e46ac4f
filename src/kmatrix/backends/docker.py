"""The Docker backend: talk to the engine through the docker SDK, run one container safely.

Configuration is built by pure functions (:func:`container_config`, :func:`check_memory`) so
tests can check every safety setting without an engine; :func:`run_container` is the only
place a container is created, and it always removes it, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import requests.exceptions

from kmatrix.backends import lifeline
from kmatrix.errors import EngineUnavailable as EngineUnavailable
from kmatrix.errors import InfraError, UserError

#: Seconds for ordinary engine API calls (ping, info, create, remove).
API_TIMEOUT = 30.0

#: Seconds past a container's timeout after which the reaper removes it on its own.
REAPER_GRACE_S = 60.0

#: Label on everything kmatrix creates, so leftovers can be found: `docker ps -a -f label=kmatrix`.
LABEL = "kmatrix"

#: How to get an engine, for the message of a missing one.
START_HINT = (
    "start one with `sudo systemctl start docker` (or `sudo dockerd &` where there is no "
    "systemd), or point DOCKER_HOST at a running engine"
)

#: A container's memory limit may use at most this share of the host's available memory:
#: whatever the probe does in the container, the host keeps most of its memory.
MAX_SHARE_OF_AVAILABLE = 0.5


@dataclass(frozen=True)
class EngineInfo:
    """What the engine says about itself and the host kernel it runs containers on."""

    server_version: str
    api_version: str
    kernel_release: str
    cgroup_version: str  # "v1" | "v2"
    cgroup_driver: str
    operating_system: str
    mem_total: int
    swap_limit: bool

    def as_json(self) -> dict[str, Any]:
        """The results.json form."""
        return {
            "name": "docker",
            "version": self.server_version,
            "api_version": self.api_version,
            "kernel_release": self.kernel_release,
            "cgroup_version": self.cgroup_version,
            "cgroup_driver": self.cgroup_driver,
            "operating_system": self.operating_system,
            "mem_total": self.mem_total,
            "swap_limit": self.swap_limit,
        }


def connect(timeout: float = API_TIMEOUT) -> Any:
    """A docker SDK client for the engine in the environment (DOCKER_HOST or the default socket).

    Raises EngineUnavailable with the reason and how to start an engine.
    """
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise EngineUnavailable(
            f"no Docker engine answers at {where} ({_short(exc)}); {START_HINT}"
        ) from None
    return client


def _short(exc: BaseException) -> str:
    """The first line of an exception, without the SDK's long wrapping."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def parse_cgroup_version(info: dict[str, Any]) -> str:
    """``v1`` or ``v2`` from `docker info` (engines before 20.10 report no version: v1)."""
    return "v2" if str(info.get("CgroupVersion", "1")) == "2" else "v1"


def engine_info(client: Any) -> EngineInfo:
    """Query the engine: versions, the host kernel, its cgroup version and memory."""
    try:
        info = client.info()
        version = client.version()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise EngineUnavailable(f"the Docker engine stopped answering ({_short(exc)})") from None
    return EngineInfo(
        server_version=str(info.get("ServerVersion") or version.get("Version") or "unknown"),
        api_version=str(version.get("ApiVersion") or "unknown"),
        kernel_release=str(info.get("KernelVersion") or "unknown"),
        cgroup_version=parse_cgroup_version(info),
        cgroup_driver=str(info.get("CgroupDriver") or "unknown"),
        operating_system=str(info.get("OperatingSystem") or "unknown"),
        mem_total=int(info.get("MemTotal") or 0),
        swap_limit=bool(info.get("SwapLimit", False)),
    )


def check_memory(limit: int, available: int | None, what: str) -> None:
    """Refuse a container memory limit that is not well below the host's available memory.

    ``available`` is MemAvailable of the engine's host (None when unknown: then only the
    limit's presence is checked). Raises UserError naming the cell and the fix.
    """
    if limit <= 0:
        raise UserError(f"{what}: a docker cell needs an explicit memory: limit, e.g. 512M")
    if available is not None and limit > available * MAX_SHARE_OF_AVAILABLE:
        raise UserError(
            f"{what}: memory {limit // 2**20} MiB is more than "
            f"{MAX_SHARE_OF_AVAILABLE:.0%} of the host's available "
            f"{available // 2**20} MiB; lower memory: in matrix.yaml"
        )


def host_mem_available(meminfo: str) -> int | None:
    """MemAvailable in bytes from /proc/meminfo text (None if absent)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


@dataclass(frozen=True)
class ContainerSpec:
    """One probe container: image, command and the limits it runs under."""

    image: str
    command: list[str]
    memory_bytes: int
    shm_size: int
    pids_limit: int
    name: str
    disk_volume: str | None = None  # a named volume mounted at /mnt/disk
    # Set by the runtime (which has CAP_SYS_RESOURCE) on the container's first process;
    # -1000 also lets that process and its children go back down to -1000 without the cap.
    oom_score_adj: int | None = None
    labels: dict[str, str] = field(default_factory=dict)


def container_config(spec: ContainerSpec) -> dict[str, Any]:
    """keyword arguments for ``client.containers.create`` (pure; every limit explicit).

    memswap_limit equal to mem_limit: the container cannot swap, so what it touches stays
    charged as memory. json-file logging regardless of the daemon's default, because the
    results are read back from the container's stdout.
    """
    config: dict[str, Any] = {
        "image": spec.image,
        "command": spec.command,
        "name": spec.name,
        "detach": True,
        "mem_limit": spec.memory_bytes,
        "memswap_limit": spec.memory_bytes,
        "shm_size": spec.shm_size,
        "pids_limit": spec.pids_limit,
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "privileged": False,
        "security_opt": ["no-new-privileges"],
        "log_config": {"type": "json-file", "config": {"max-size": "20m"}},
        "labels": {LABEL: "1", **spec.labels},
    }
    if spec.oom_score_adj is not None:
        config["oom_score_adj"] = spec.oom_score_adj
    if spec.disk_volume:
        config["volumes"] = {spec.disk_volume: {"bind": "/mnt/disk", "mode": "rw"}}
    return config


@dataclass
class ContainerRun:
    """How a container ended and what it printed."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    duration_s: float = 0.0
    cgroup_parent: str | None = None
    problems: list[str] = field(default_factory=list)


#: Containers this process is running, so Ctrl-C can remove them (see kill_all).
_ACTIVE: dict[str, Any] = {}
_ACTIVE_LOCK = threading.Lock()


def kill_all() -> int:
    """Force-remove every container this process is running; how many there were.

    Only ours, by id: the engine may be shared with other users and their containers.
    """
    with _ACTIVE_LOCK:
        containers = list(_ACTIVE.values())
    # Already gone, or the engine died: the worker thread waiting on it reports that.
    quiet = contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException)
    for container in containers:
        with quiet:
            container.remove(force=True, v=True)
    return len(containers)


def run_container(client: Any, config: dict[str, Any], timeout: float) -> ContainerRun:
    """Create, start and wait for one container (killed after ``timeout`` s); always remove it."""
    run = ContainerRun()
    start = time.monotonic()
    container = None
    try:
        container = client.containers.create(**config)
        with _ACTIVE_LOCK:
            _ACTIVE[container.id] = container
        # The container must not outlive kmatrix (kill -9 included) nor its timeout.
        with lifeline.reaper(["docker", "rm", "-f", container.id], timeout + REAPER_GRACE_S):
            container.start()
            _wait(container, timeout, run)
        container.reload()
        state = container.attrs.get("State", {})
        run.oom_killed = bool(state.get("OOMKilled"))
        run.stdout = _logs(container, stdout=True)
        run.stderr = _logs(container, stdout=False)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        run.problems.append(f"docker: {_short(exc)}")
    finally:
        run.duration_s = round(time.monotonic() - start, 2)
        if container is not None:
            _remove(container, run)
            with _ACTIVE_LOCK:
                _ACTIVE.pop(container.id, None)
    return run


def _wait(container: Any, timeout: float, run: ContainerRun) -> None:
    """Wait for the container to exit; kill it when the timeout passes."""
    try:
        result = container.wait(timeout=timeout)
        run.exit_code = int(result.get("StatusCode", -1))
    except requests.exceptions.RequestException:
        # The SDK's wait timeout surfaces as a read timeout (or ConnectionError on some
        # urllib3 versions): the container is still running.
        run.timed_out = True
        container.kill()
        run.exit_code = int(container.wait(timeout=API_TIMEOUT).get("StatusCode", -1))


def _logs(container: Any, stdout: bool) -> str:
    data = container.logs(stdout=stdout, stderr=not stdout)
    return bytes(data).decode(errors="replace")


def _remove(container: Any, run: ContainerRun) -> None:
    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        run.problems.append(
            f"could not remove container {container.name} ({_short(exc)}); "
            f"remove it with `docker rm -f {container.name}`"
        )


def create_volume(client: Any, name: str) -> str:
    """A named local volume (on the engine host's disk) for the disk-backed scenarios."""
    try:
        client.volumes.create(name=name, labels={LABEL: "1"})
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise InfraError(f"cannot create docker volume {name} ({_short(exc)})") from None
    return name


def remove_volume(client: Any, name: str) -> str | None:
    """Remove a volume; the problem as text (with the command to finish the job) or None."""
    try:
        client.volumes.get(name).remove(force=True)
    except docker.errors.NotFound:
        return None
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        return f"could not remove volume {name} ({_short(exc)}); run `docker volume rm {name}`"
    return None
