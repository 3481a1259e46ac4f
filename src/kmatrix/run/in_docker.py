"""`--runtime docker`: run a kmatrix command inside the runner image instead of on the host.

The container gets the host's kmatrix cache (downloads are shared), the output directory,
the matrix file (read-only), the Debian mirror resolved on the host (the container's apt
sources may differ), and ``/dev/kvm`` only when a smoke boot on the host proved KVM works.
:func:`runner_config` builds the container's settings as a pure function; :func:`run_runner`
is the only place the container runs: with a timeout, its output streamed, stopped on Ctrl-C
or SIGTERM, and always removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import requests.exceptions

from kmatrix.backends import lifeline, qemu
from kmatrix.backends.docker import API_TIMEOUT, LABEL, connect
from kmatrix.cells.oom_saved import READY_TIMEOUT_S, SAVE_TIMEOUT_S
from kmatrix.cells.plan import plan_units
from kmatrix.config import DebianKernel, DockerKernel, Kernel, Matrix, load_matrix
from kmatrix.debian.archive import default_cache_dir, resolve_mirror
from kmatrix.debian.sources import resolve_security_mirror
from kmatrix.debian.suites import Resolver
from kmatrix.errors import InfraError, UserError
from kmatrix.guest.kernels import prepare_debian
from kmatrix.report.markdown import REPORTS
from kmatrix.run.interrupt import sigterm_as_interrupt
from kmatrix.run.runner_image import BaseChoice, ensure_runner_image, require_checkout

CONTAINER_CACHE = "/cache"
CONTAINER_OUT = "/out"
CONTAINER_MATRIX = "/kmatrix/matrix.yaml"
#: The project's reports/ in the image: `invoke cell` leaves the cell's report and console
#: there (reports/cell-NAME/), so the host's reports/ is mounted over it.
CONTAINER_REPORTS = "/src/reports"
RUNTIMES = ("host", "docker")
#: Seconds for resolving and downloading a kernel inside the container before it boots.
DOWNLOAD_ALLOWANCE_S = 600
#: Memory for QEMU itself, Python and the report on top of the largest guest.
RUNNER_OVERHEAD = 1024 * 1024 * 1024
PIDS_LIMIT = 512
#: The outer bound of the OOM boots, kept generous on purpose: the runner's own timeouts end
#: a stuck boot first; this one only catches a runner that hangs as a whole.
OOM_BOOT_ALLOWANCE_S = 120
OOM_UNIT_SLACK_S = 10
#: Runner containers of this process, by name, for :func:`stop_runners`.
_RUNNING: dict[str, Any] = {}
_RUNNING_LOCK = threading.Lock()
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


@dataclass(frozen=True)
class RunnerSpec:
    """One kmatrix command in the runner image: what it runs and what it may touch."""

    image: str
    command: list[str]  # arguments to the image's entrypoint, `invoke`
    cache_dir: Path
    out_dir: Path
    matrix_file: Path
    mirror: str
    memory_bytes: int
    user: str  # "uid:gid": files in the cache and output stay the caller's
    name: str
    kvm_gid: int | None = None  # None: no /dev/kvm (TCG); else its group on the host
    reports_dir: Path | None = None  # mounted as the image's reports/
    env: dict[str, str] = field(default_factory=dict)


def runner_config(spec: RunnerSpec) -> dict[str, Any]:
    """keyword arguments for ``client.containers.create`` (pure; every limit explicit).

    Host networking: the mirror (and a proxy on the host's loopback) is reachable exactly as
    from the host. No capabilities: QEMU under TCG or with /dev/kvm needs none.
    """
    config: dict[str, Any] = {
        "image": spec.image,
        "command": spec.command,
        "name": spec.name,
        "detach": True,
        "user": spec.user,
        "environment": {
            **spec.env,
            "KMATRIX_CACHE": CONTAINER_CACHE,
            "KMATRIX_MIRROR": spec.mirror,
        },
        "volumes": {
            str(spec.cache_dir): {"bind": CONTAINER_CACHE, "mode": "rw"},
            str(spec.out_dir): {"bind": CONTAINER_OUT, "mode": "rw"},
            str(spec.matrix_file): {"bind": CONTAINER_MATRIX, "mode": "ro"},
        },
        "network_mode": "host",
        "mem_limit": spec.memory_bytes,
        "memswap_limit": spec.memory_bytes,
        "pids_limit": PIDS_LIMIT,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "log_config": {"type": "json-file", "config": {"max-size": "20m"}},
        "labels": {LABEL: "1", "kmatrix.role": "runner"},
    }
    if spec.reports_dir is not None:
        config["volumes"][str(spec.reports_dir)] = {"bind": CONTAINER_REPORTS, "mode": "rw"}
    if spec.kvm_gid is not None:
        config["devices"] = ["/dev/kvm:/dev/kvm:rwm"]
        config["group_add"] = [str(spec.kvm_gid)]
    return config


def cell_command(kernel: str, output_name: str, force: bool = False, accel: str = "") -> list[str]:
    """`invoke cell` as the container runs it: the matrix and output at their mount points."""
    argv = ["cell", "--kernel", kernel, "--matrix-file", CONTAINER_MATRIX]
    argv += ["--output", f"{CONTAINER_OUT}/{output_name}"]
    if force:
        argv.append("--force")
    if accel:
        argv += ["--accel", accel]
    return argv


def check_runtime(runtime: str) -> str:
    """``host`` or ``docker``; anything else is a UserError naming the choices."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    return runtime


#: QEMUs a runner container runs at once (backends.qemu.SLOTS_ENV): the accounting boot
#: beside an OOM boot, or two OOM lanes.
RUNNER_SLOTS = 2


def runner_memory(matrix: Matrix, kernel: DebianKernel) -> int:
    """The container's memory limit: the guests it runs at once (RUNNER_SLOTS), plus QEMU
    and Python."""
    guest = kernel.memory or matrix.guest.memory
    oom = matrix.oom.memory
    return max(guest + oom, RUNNER_SLOTS * oom) + RUNNER_OVERHEAD


def runner_slots_env(runners: int) -> dict[str, str]:
    """The QEMU caps a runner container gets: its own, and the whole run's when ``runners``
    containers run at once (what its cells record as ``qemu_slots``)."""
    return {
        qemu.SLOTS_ENV: str(RUNNER_SLOTS),
        qemu.MACHINE_SLOTS_ENV: str(max(1, runners) * RUNNER_SLOTS),
    }


def runner_timeout(matrix: Matrix) -> float:
    """Seconds the whole container may run: download, the accounting boot, the OOM boots.

    OOM boots can restart after an early end, so their budget counts twice; the boot they
    are restored from (oom.snapshot) comes before them.
    """
    units = plan_units(matrix.oom.experiments, matrix.oom.repeats)
    per_unit = matrix.oom.timeout + OOM_UNIT_SLACK_S
    oom = float(OOM_BOOT_ALLOWANCE_S + len(units) * per_unit if units else 0)
    if units and matrix.oom.snapshot:
        oom += READY_TIMEOUT_S + SAVE_TIMEOUT_S
    return float(DOWNLOAD_ALLOWANCE_S + matrix.probe.cell_timeout + 2 * oom)


def proxy_env(environ: dict[str, str]) -> dict[str, str]:
    """The host's proxy settings, for downloads inside the container."""
    return {k: environ[k] for k in PROXY_VARS if environ.get(k)}


def check_runnable(kernel: Kernel) -> DebianKernel:
    """The kernel if the runner can run it (a Debian kernel); else UserError with the reason
    and what to do instead."""
    if isinstance(kernel, DebianKernel):
        return kernel
    if isinstance(kernel, DockerKernel):
        raise UserError(
            f"kernel {kernel.name!r} is a docker cell (the host kernel in a container); "
            "run it without --runtime docker"
        )
    raise UserError(
        f"kernel {kernel.name!r} is a local build ({kernel.path}), which is not mounted "
        "into the runner container; run it without --runtime docker"
    )


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def _stream(container: Any, log: Callable[[str], None]) -> None:
    """Forward the container's output line by line until it exits."""
    pending = b""
    try:
        for chunk in container.logs(stream=True, follow=True):
            pending += bytes(chunk)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                log(line.decode(errors="replace").rstrip("\r"))
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return  # the container was removed under us: the waiting thread reports why
    if pending:
        log(pending.decode(errors="replace"))


def run_runner(
    client: Any, config: dict[str, Any], timeout: float, log: Callable[[str], None] = print
) -> int:
    """Run the container to its end (killed after ``timeout`` s); its exit code.

    The container is removed whatever happens: exit, timeout, Ctrl-C, SIGTERM, engine error.
    """
    container = None
    try:
        with sigterm_as_interrupt():
            container = client.containers.create(**config)
            with _RUNNING_LOCK:
                _RUNNING[container.name] = container
            # Removed by the reaper if kmatrix dies (kill -9 included) or overruns.
            with lifeline.reaper(["docker", "rm", "-f", container.id], timeout + 60):
                container.start()
                streamer = threading.Thread(target=_stream, args=(container, log), daemon=True)
                streamer.start()
                code = _wait(container, timeout)
                streamer.join(timeout=10)
            return code
    except KeyboardInterrupt:
        # The finally below removes the container (and QEMU with it) before this propagates.
        raise InfraError(
            f"interrupted: runner container {config['name']} stopped and removed; "
            "run the same command again to resume from the cache"
        ) from None
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise InfraError(f"runner container {config['name']}: {str(exc)[:300]}") from None
    finally:
        if container is not None:
            with _RUNNING_LOCK:
                _RUNNING.pop(container.name, None)
            _remove(container)


def stop_runners() -> int:
    """Remove every runner container this process started; how many there were.

    For runs with cells in worker threads: Ctrl-C reaches only the main thread, so it stops
    the workers' containers through this (only ours, by name: the engine may be shared).
    """
    with _RUNNING_LOCK:
        running = list(_RUNNING.values())
    for container in running:
        with contextlib.suppress(InfraError):
            _remove(container)
    return len(running)


def _wait(container: Any, timeout: float) -> int:
    try:
        return int(container.wait(timeout=timeout).get("StatusCode", -1))
    except requests.exceptions.RequestException:
        # The SDK reports its wait timeout as a read timeout: the container still runs.
        container.kill()
        container.wait(timeout=API_TIMEOUT)
        raise InfraError(
            f"runner container {container.name} did not finish within {timeout:.0f} s; "
            "stopped and removed"
        ) from None


def _remove(container: Any) -> None:
    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise InfraError(
            f"could not remove runner container {container.name} ({str(exc)[:200]}); "
            f"remove it with `docker rm -f {container.name}`"
        ) from None


def kvm_group(matrix: Matrix, kernel: DebianKernel, accel: str, cache: Path) -> int | None:
    """The group of /dev/kvm when the container should get it, else None (TCG).

    Only when KVM is allowed (``accel``, else the matrix's) and a smoke boot of this cell's
    kernel on the host printed its banner: /dev/kvm existing proves nothing (nested KVM can
    hang). The kernel is downloaded into the shared cache, so the container finds it there.
    """
    if (accel or matrix.accel) == "tcg" or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return None
    resolver = Resolver(matrix, cache)
    archive = resolver.main_archive(kernel.arch)
    prepared = prepare_debian(archive, kernel, resolver.resolve(kernel), cache)
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    if not qemu.kvm_smoke_test(prepared.vmlinuz, work):
        return None
    return os.stat("/dev/kvm").st_gid


def _security_env(matrix: Matrix, mirror: str) -> dict[str, str]:
    """The security archive as resolved here: the container has no apt sources of the host."""
    security, _ = resolve_security_mirror(matrix.security_mirror, mirror, matrix.mirror)
    return {"KMATRIX_SECURITY_MIRROR": security} if security else {}


def run_cell_in_docker(
    matrix_path: Path,
    kernel_name: str,
    output: Path,
    *,
    force: bool = False,
    accel: str = "",
    base: BaseChoice = "auto",
    timeout: float | None = None,
    reports_dir: Path = REPORTS,
    runners: int = 1,
    log: Callable[[str], None] = print,
) -> int:
    """`invoke cell --runtime docker`: the cell in the runner image; the container's exit code.

    The one-cell results land at ``output`` and the cell's report and console log in
    ``reports_dir``/cell-KERNEL/, as with the host runtime. ``runners``: how many runner
    containers the run has at once (this one included).
    """
    matrix = load_matrix(matrix_path)
    (entry,) = matrix.select([kernel_name])
    kernel = check_runnable(entry)
    require_checkout()
    mirror, cache = resolve_mirror(matrix.mirror), default_cache_dir()
    client = connect()
    image = ensure_runner_image(client, mirror, cache, base, log)
    cache.mkdir(parents=True, exist_ok=True)
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    gid = kvm_group(matrix, kernel, accel, cache)
    reports_dir.mkdir(parents=True, exist_ok=True)
    log(f"{kernel.name}: running in {image.tag} ({'TCG' if gid is None else 'KVM passed through'})")
    spec = RunnerSpec(
        image=image.tag,
        command=cell_command(kernel.name, output.name, force, accel),
        cache_dir=cache.resolve(),
        out_dir=output.parent,
        matrix_file=matrix_path.resolve(),
        mirror=mirror,
        memory_bytes=runner_memory(matrix, kernel),
        user=f"{os.getuid()}:{os.getgid()}",
        name=f"kmatrix-runner-{kernel.name}-{secrets.token_hex(4)}",
        kvm_gid=gid,
        reports_dir=reports_dir.resolve(),
        env=proxy_env(dict(os.environ)) | _security_env(matrix, mirror) | runner_slots_env(runners),
    )
    code = run_runner(client, runner_config(spec), timeout or runner_timeout(matrix), log)
    # The container printed its own mount points; these are the same files on this host.
    log(f"runner exit {code}: results in {output}, report and console under {reports_dir}")
    return code
