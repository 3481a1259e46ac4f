"""One docker cell: the probe in a container on the host kernel -> a results.json cell.

The counterpart of cells/qemu.py. The container runs under an explicit memory limit (no
swap), an explicit /dev/shm size, no network, no capabilities and a pids limit; the probe
measures its own (the container's) memory cgroup. Experiments that would drive the *host*
into a global OOM (or panic it) are refused and recorded as refused, never run.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from kmatrix.backends import docker as engine
from kmatrix.cells.plan import DockerPlan, OomPlan
from kmatrix.errors import InfraError, UserError
from kmatrix.guest.kernels import parse_kconfig, recorded_config
from kmatrix.guest.probe_image import ensure_probe_image
from kmatrix.guest.userland import PROBES_DIR, Userland
from kmatrix.results.contract import Cell, CellStatus, Engine
from kmatrix.results.contract_oom import OomExperiment
from kmatrix.results.oom import entries_from_probe
from kmatrix.results.repeats import aggregate_scenarios
from kmatrix.results.schema import ProbeOutput, new_cell, parse_probe_output
from kmatrix.units import MIB

#: Docker's own default --shm-size; used when the cell sets none, but always passed explicitly.
DEFAULT_SHM_SIZE = 64 * MIB
DEFAULT_PIDS_LIMIT = 256
#: The OOM harness's oom_score_adj. None: a negative value needs CAP_SYS_RESOURCE in the
#: runtime, and on engines without it (e.g. dockerd inside a sandbox) runc cannot start the
#: container at all ("can't get final child's PID from pipe"). The probe must cope.
OOM_HARNESS_ADJ: int | None = None

#: Set to 1 to make a missing engine an error (CI), like ``require_docker: true``.
REQUIRE_ENV = "KMATRIX_REQUIRE_DOCKER"

GLOBAL_OOM_REASON = (
    "refused: the docker backend shares the host kernel, so a global OOM (or the panic "
    "oom-no-killable expects) would hit the host itself; this experiment runs in QEMU cells"
)


#: Room the probe, its interpreter and a scenario child need besides the measured pages.
HEADROOM = 96 * MIB
#: What the over-shm-limit scenarios write beyond /dev/shm's size (probes/scenario_checks.py).
OVER_LIMIT_EXTRA = 32 * MIB


def check_limits(memory: int, shm_size: int, scenario_size: int, what: str) -> None:
    """Refuse limits under which the probe would hit the container's own memory limit.

    Inside a container /proc/meminfo is the host's, so the probe's own "would exhaust
    memory" check cannot see the container limit; a memcg OOM kill would lose the cell.
    """
    needed = max(scenario_size, shm_size + OVER_LIMIT_EXTRA) + HEADROOM
    if memory < needed:
        raise UserError(
            f"{what}: memory {memory // MIB} MiB is too small for shm_size {shm_size // MIB} "
            f"MiB and probe size {scenario_size // MIB} MiB (needs at least {needed // MIB} "
            "MiB); raise memory: or lower shm_size: / probe.size in matrix.yaml"
        )


def is_global_oom(name: str) -> bool:
    """True for experiments that exhaust the whole machine's memory or panic it."""
    return name.startswith("oom-global-") or name == "oom-no-killable"


def probe_names(timeout: float = 30.0) -> list[str]:
    """Scenario and experiment names the probe knows (``probe.py --list``), in its order."""
    argv = [sys.executable, str(PROBES_DIR / "probe.py"), "--list"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InfraError(
            f"cannot list the probe's scenarios with {' '.join(argv)}: {exc}"
        ) from None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def split_names(requested: Sequence[str] | str, known: list[str]) -> tuple[list[str], list[str]]:
    """(names to run, global OOM names refused) for a docker cell, in the probe's order."""
    wanted = known if requested == "all" else [n for n in known if n in requested]
    return (
        [n for n in wanted if not is_global_oom(n)],
        [n for n in wanted if is_global_oom(n)],
    )


def refused_record(name: str) -> OomExperiment:
    """The results.json oom entry of an experiment this backend does not run.

    ``panic`` is None, not False: nothing was measured, and a report must not read the
    refusal as "this kernel does not panic".
    """
    return {
        "name": name,
        "status": "refused",
        "reason": GLOBAL_OOM_REASON,
        "repeats": 0,
        "victims": [],
        "panic": None,
        "kills": [],
    }


def probe_command(
    names: list[str],
    size_bytes: int,
    timeout: float,
    oom: OomPlan | None = None,
    repeats: int = 1,
) -> list[str]:
    """Arguments after the image's entrypoint (python3 /probe/probe.py).

    With ``oom`` (the OOM container) the memcg experiments run in the container's own
    memory cgroup: an unprivileged container cannot create one, and its limit (--memory)
    is the one a team's containers meet in production.
    """
    argv = [
        "--size-mib", str(size_bytes // MIB),
        "--shm-dir", "/dev/shm",
        "--disk-dir", "/mnt/disk",
        "--scenarios", ",".join(names),
        "--timeout", str(int(timeout)),
        "--repeats", str(repeats),
        "--host-kernel",  # the hello then leaves out the host's boot line
    ]  # fmt: skip
    if oom is not None:
        argv += ["--oom-memcg", "container", "--oom-repeats", str(oom.repeats)]
        argv += ["--oom-timeout", str(oom.timeout_s)]
    return argv


def classify(run: engine.ContainerRun, probe: ProbeOutput) -> tuple[CellStatus, str]:
    """A cell's status and reason from how the container ended and what it printed."""
    if probe.complete:
        return "ok", ""
    if run.timed_out:
        return "timeout", f"no complete result before the timeout; {len(probe.scenarios)} scenarios"
    if run.oom_killed:
        return "error", "the container was OOM-killed before the probe finished; raise memory:"
    if probe.problems:
        return "error", "probe output unusable: " + "; ".join(probe.problems[:3])
    if run.problems:
        return "error", "; ".join(run.problems)
    tail = run.stderr.strip().splitlines()[-1:] or ["no error output"]
    return "error", f"probe exited {run.exit_code} without finishing: {tail[0][:200]}"


def _engine_is_local() -> bool:
    host = os.environ.get("DOCKER_HOST", "")
    return not host or host.startswith("unix://")


def _host_kernel_config() -> dict[str, str]:
    """The CONFIG_* values that matter, from /proc/config.gz when the kernel exposes it."""
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode(errors="replace")
    except OSError:
        return {}
    return recorded_config(parse_kconfig(text))


def _available_memory(info: engine.EngineInfo) -> int:
    """MemAvailable of a local engine's host; for a remote engine, its MemTotal (the best known)."""
    if _engine_is_local():
        available = engine.host_mem_available(Path("/proc/meminfo").read_text())
        if available is not None:
            return available
    return info.mem_total


def require_engine(require_docker: bool) -> bool:
    """True when a missing engine is an error (matrix.yaml or the environment says so)."""
    return require_docker or os.environ.get(REQUIRE_ENV, "") in ("1", "true", "yes")


def run_docker_cell(
    plan: DockerPlan,
    userland: Userland,
    cache: Path,
    log_dest: Path,
    log: Callable[[str], None] = print,
) -> Cell:
    """Run the probe in containers on the host kernel as ``plan`` says; its cell (any status).

    A missing engine gives a ``skipped`` cell (``error`` when required); a bad memory limit
    raises UserError; everything else the container does becomes the status.
    """
    cell = new_cell(plan.name, "docker")
    memory, shm_size = plan.memory_bytes, plan.shm_size
    cell |= {"accel": plan.accel, "memory_bytes": memory, "shm_size_bytes": shm_size}
    try:
        client = engine.connect()
    except engine.EngineUnavailable as exc:
        # Skipping keeps the rest of the matrix useful on a machine without Docker; CI
        # sets require_docker so that a missing engine cannot pass unnoticed.
        required = plan.require_engine
        hint = "" if required else f" (set {REQUIRE_ENV}=1 to make this an error)"
        cell |= {"status": "error" if required else "skipped", "reason": str(exc) + hint}
        return cell
    info = engine.engine_info(client)
    # EngineInfo.as_json has Engine's keys but "image" (tests/test_contract.py checks it).
    cell["engine"] = cast(Engine, info.as_json())
    cell["kernel"] = {
        "name": plan.name,
        "release": info.kernel_release,
        "package": None,
        "version": None,
        "sha256": None,
        "config": _host_kernel_config() if _engine_is_local() else {},
        "host_kernel": True,
    }
    engine.check_memory(memory, _available_memory(info), f"kernels: {plan.name}")
    check_limits(memory, shm_size, plan.probe.size_bytes, f"kernels: {plan.name}")
    names, refused = split_names(plan.probe.scenarios, probe_names())
    image = ensure_probe_image(client, userland, cache, log)
    cell["engine"]["image"] = image.tag
    # Accounting and OOM experiments run in separate containers: an OOM in the container's
    # cgroup can take the probe down with it, and must not cost the accounting results.
    parts = [
        (group, adj)
        for group, adj in (
            ([n for n in names if not n.startswith("oom-")], None),
            ([n for n in names if n.startswith("oom-")], OOM_HARNESS_ADJ),
        )
        if group
    ]
    results = [_run_probe(client, plan, image.tag, group, adj) for group, adj in parts]
    _write_log(log_dest, [run for run, _ in results])
    _fill(cell, [(group, *result) for (group, _), result in zip(parts, results, strict=True)])
    cell["oom"] = [refused_record(n) for n in refused] + cell["oom"]
    return cell


def _fill(cell: Cell, results: list[tuple[list[str], engine.ContainerRun, ProbeOutput]]) -> None:
    """Status, scenarios and OOM records from the container(s).

    The cell's status is the accounting container's. A failed OOM container turns each of
    its experiments that left no record into an ``error`` entry with the reason, so the
    accounting results stay usable and the failure is still in plain sight.
    """
    status: CellStatus = "ok"
    reason = ""
    for names, run, probe in results:
        part_status, part_reason = classify(run, probe)
        is_oom = names[0].startswith("oom-")
        if part_status != "ok":
            cell.setdefault("console_tail", run.stderr.strip().splitlines()[-20:])
            if not is_oom and status == "ok":
                status, reason = part_status, part_reason
        cell["scenarios"] += aggregate_scenarios(probe.scenarios)
        # The host's kernel log is not ours to read: victims come from the probe's records.
        entries = entries_from_probe(probe)
        cell["oom"] += entries
        if is_oom and part_status != "ok":
            seen = {rec.get("name") for rec in entries}
            cell["oom"] += [_failed_record(n, part_reason) for n in names if n not in seen]
        if probe.hello and not cell.get("probe"):
            cell["probe"] = probe.hello
    cell |= {
        "status": status,
        "reason": reason,
        "duration_s": round(sum(run.duration_s for _, run, _ in results), 2),
    }


def _failed_record(name: str, reason: str) -> OomExperiment:
    """The oom entry of an experiment whose container failed before reporting it."""
    return {"name": name, "status": "error", "reason": reason, "repeats": 0, "victims": [],
            "panic": None, "kills": []}  # fmt: skip


def _run_probe(
    client: Any, plan: DockerPlan, image: str, names: list[str], oom_score_adj: int | None
) -> tuple[engine.ContainerRun, ProbeOutput]:
    """One container with a fresh disk volume; both are gone when this returns."""
    suffix = uuid.uuid4().hex[:8]
    volume = engine.create_volume(client, f"kmatrix-disk-{plan.name}-{suffix}")
    try:
        spec = engine.ContainerSpec(
            image=image,
            command=probe_command(
                names,
                plan.probe.size_bytes,
                timeout=120,
                oom=plan.oom if names[0].startswith("oom-") else None,
                repeats=plan.probe.repeats,
            ),
            memory_bytes=plan.memory_bytes,
            shm_size=plan.shm_size,
            pids_limit=plan.pids_limit,
            name=f"kmatrix-{plan.name}-{suffix}",
            disk_volume=volume,
            labels={"kmatrix.cell": plan.name},
            oom_score_adj=oom_score_adj,
        )
        run = engine.run_container(client, engine.container_config(spec), plan.cell_timeout_s)
    finally:
        problem = engine.remove_volume(client, volume)
    if problem:
        run.problems.append(problem)
    return run, parse_probe_output(run.stdout.splitlines())


def _write_log(dest: Path, runs: list[engine.ContainerRun]) -> None:
    """Keep what the containers printed, like a QEMU cell's console log."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(
        "".join(
            f"# container {i}: exit {run.exit_code}, timed_out={run.timed_out}, "
            f"oom_killed={run.oom_killed}\n# stderr\n{run.stderr}\n# stdout\n{run.stdout}\n"
            for i, run in enumerate(runs, 1)
        )
    )
