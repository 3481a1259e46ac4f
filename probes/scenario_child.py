"""One scenario in a fresh child: the fork / measure / kill protocol, and its record.

Parent                                  Child (own process group, scenario cgroup)
  fork ------------------------------->   setpgid, join cgroup, prepare
       <------------- ready (JSON line)   (fd to statvfs, cgroup joined?)
  measure BEFORE
  "g" -------------------------------->   act
       <------------ result (JSON line)   ok | errno | exception, detail
  measure AFTER (child still alive)       blocks until killed
  SIGKILL the process group, reap, check /proc, remove cgroup and named file

The messages are JSON lines (messages.py); :func:`run_scenario` is the entry point and
never raises.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import accounting
import system
from messages import Channel, Message, ProtocolError, errno_name, send
from scenario_types import CHUNK_SIZE, Ctx, Scenario, Settings, named_shm_path

#: How long to wait for a killed process group to vanish from /proc.
REAP_TIMEOUT = 5.0


@functools.cache
def _chunk() -> bytes:
    """What the fill steps write from: made once, by the first scenario, so no child faults
    in and fills 1 MiB of it before its ready (every child shares these pages with the
    probe, read-only). Not at import: an OOM boot's harness and roles would carry it."""
    return b"\xa5" * CHUNK_SIZE


#: Per-process metrics reported for helper processes (memfd-2proc's grandchild).
HELPER_METRICS = ("VmRSS", "RssShmem", "Pss")


# ---- child side ------------------------------------------------------------------------


def _child_setup(out_fd: int, cgroup_dir: str | None) -> Message:
    """Own process group, stdout away from the record stream, join the cgroup."""
    os.setpgid(0, 0)
    os.dup2(2, 1)
    if out_fd > 2:
        os.close(out_fd)
    if cgroup_dir is None:
        return {"cgroup_joined": False}
    try:
        system.join_cgroup(cgroup_dir)
    except OSError as exc:
        return {"cgroup_joined": False, "cgroup_error": str(exc)}
    return {"cgroup_joined": True}


def _perform(step: Callable[[Ctx], None], ctx: Ctx) -> Message:
    """Run one scenario step and describe the outcome as a result message."""
    try:
        step(ctx)
    except OSError as exc:
        return {"status": "errno", "errno": errno_name(exc), "error": str(exc)}
    except Exception as exc:
        text = "".join(traceback.format_exception_only(exc)).strip()
        return {"status": "exception", "error": text}
    return {"status": "ok"}


def _wait_go(go_r: int) -> None:
    """Block until the parent says go; exit quietly if the parent is gone."""
    if not os.read(go_r, 1):
        os._exit(0)


def child_main(
    scenario: Scenario, ctx: Ctx, go_r: int, res_w: int, cgroup_dir: str | None, out_fd: int
) -> NoReturn:
    """Body of the scenario child; never returns."""
    try:
        ready = _child_setup(out_fd, cgroup_dir)
        prepared = _perform(scenario.prepare, ctx) if scenario.prepare else {"status": "ok"}
        send(res_w, {**ready, "fs_fd": ctx.fs_fd, "fs_path": ctx.fs_path})
        _wait_go(go_r)
        if prepared["status"] == "ok":
            result = _perform(scenario.act, ctx)
        else:
            result = {**prepared, "failed_step": "prepare"}
        send(res_w, {**result, "detail": ctx.detail})
        _wait_go(go_r)  # hold everything until the parent kills the process group
    except BaseException as exc:
        try:
            send(res_w, {"status": "exception", "error": repr(exc), "detail": ctx.detail})
        finally:
            os._exit(1)
    os._exit(0)


# ---- parent side -----------------------------------------------------------------------


@dataclass
class Child:
    """A running scenario child as seen by the parent."""

    pid: int
    go_w: int
    channel: Channel
    fds: list[int] = field(default_factory=list)

    def go(self) -> None:
        """Tell the child to perform its action."""
        os.write(self.go_w, b"g")

    def close(self) -> None:
        """Close the parent's pipe ends."""
        for fd in self.fds:
            os.close(fd)


def spawn(scenario: Scenario, settings: Settings, cgroup_dir: str | None, out_fd: int) -> Child:
    """Fork the scenario child; it waits for the parent after sending "ready"."""
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    ctx = Ctx(
        name=scenario.name,
        size=scenario.size(settings),
        settings=settings,
        named_path=named_shm_path(settings, scenario.name),
        protocol_fds=[go_r, res_w],
    )
    ctx.chunk = _chunk()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(res_r)
        child_main(scenario, ctx, go_r, res_w, cgroup_dir, out_fd)
    os.close(go_r)
    os.close(res_w)
    with contextlib.suppress(OSError):  # fails harmlessly if the child already did it
        os.setpgid(pid, pid)
    return Child(pid, go_w, Channel(res_r), [go_w, res_r])


def _reap_group(pgid: int) -> bool:
    """Reap every exited child of ours in process group ``pgid`` without blocking; True
    when no child of ours is left in it."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


def kill_group(pid: int, subreaper: bool = False) -> list[int]:
    """SIGKILL the child's process group, reap it, and return pids still in /proc.

    ``subreaper``: the probe adopts orphans, so every member of the group is its child once
    the scenario child is reaped; waitpid(-pgid) then reaps them all and, when none is left,
    [] comes back without a look at /proc."""
    for target, kill in ((pid, os.killpg), (pid, os.kill)):
        with contextlib.suppress(ProcessLookupError):
            kill(target, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    deadline = time.monotonic() + REAP_TIMEOUT
    # A subreaper's group members are its children now (each reparented as its parent
    # died): no children left in the group means none left at all, and the /proc scan
    # below (~30 ms a scenario under TCG) is needed only for a group that will not die.
    while subreaper and time.monotonic() < deadline:
        if _reap_group(pid):
            return []
        time.sleep(0.01)
    while True:
        _reap_group(pid)
        left = system.pids_in_group(pid)
        if not left or time.monotonic() > deadline:
            return left
        for leftover in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)
        time.sleep(0.01)


def new_record(scenario: Scenario, settings: Settings) -> Message:
    """An empty scenario record (see the README of probes/ for the format)."""
    return {
        "type": "scenario",
        "name": scenario.name,
        "size_bytes": scenario.size(settings),
        "metrics": {},
        "before": {},
        "after": {},
        "errno": None,
        "error": None,
        "detail": {},
        "duration_s": 0.0,
    }


def run_scenario(
    scenario: Scenario, settings: Settings, cgroups: system.Cgroups, timeout: float, out_fd: int
) -> Message:
    """Run one scenario end to end; never raises, failures end up in ``error``."""
    start = time.monotonic()
    record = new_record(scenario, settings)
    try:
        skip = scenario.check(settings) if scenario.check else None
        if skip:
            record["error"] = skip.error
            record["detail"].update(skip.detail)
        else:
            _run_in_child(scenario, settings, cgroups, timeout, out_fd, record)
    except Exception as exc:
        record["error"] = f"probe error: {exc!r}"
    record["duration_s"] = round(time.monotonic() - start, 3)
    return record


def _scenario_cgroup(cgroups: system.Cgroups, name: str, detail: Message) -> str | None:
    """Create the per-scenario cgroup, or None (shared/none mode, or creation failed)."""
    if cgroups.mode != "per-scenario":
        return None
    try:
        return system.make_scenario_cgroup(cgroups, name)
    except OSError as exc:
        detail["cgroup_error"] = f"cannot create scenario cgroup: {exc}"
        return None


def _run_in_child(
    scenario: Scenario,
    settings: Settings,
    cgroups: system.Cgroups,
    timeout: float,
    out_fd: int,
    record: Message,
) -> None:
    """Fork, measure around the action, and always clean up."""
    cgroup_dir = _scenario_cgroup(cgroups, scenario.name, record["detail"])
    child = spawn(scenario, settings, cgroup_dir, out_fd)
    try:
        _drive(child, cgroups, cgroup_dir, time.monotonic() + timeout, record)
    except ProtocolError as exc:
        record["error"] = str(exc)
    finally:
        _cleanup(child, settings, cgroup_dir, record)


def _drive(
    child: Child, cgroups: system.Cgroups, cgroup_dir: str | None, deadline: float, record: Message
) -> None:
    """ready -> BEFORE -> go -> result -> AFTER."""
    ready = child.channel.receive(deadline, "ready")
    target = _target(child.pid, ready, cgroups, cgroup_dir, record["detail"])
    record["before"] = accounting.measure(target)
    child.go()
    result = child.channel.receive(deadline, "result")
    record["after"] = accounting.measure(target)
    record["metrics"] = accounting.deltas(record["before"], record["after"])
    _apply_result(record, result)
    _measure_extras(record, target)


def _target(
    pid: int, ready: Message, cgroups: system.Cgroups, cgroup_dir: str | None, detail: Message
) -> accounting.Target:
    """What to measure for this child, from its ready message."""
    if ready.get("cgroup_joined"):
        path, mode = cgroup_dir, "per-scenario"
    elif cgroups.mode != "none" and cgroups.own_dir:
        path, mode = cgroups.own_dir, "shared"
    else:
        path, mode = None, "none"
    detail["cgroup"] = {"mode": mode, "path": path}
    if "cgroup_error" in ready:
        detail["cgroup_error"] = ready["cgroup_error"]
    fs_path = ready.get("fs_path")
    if ready.get("fs_fd") is not None:
        fs_path = f"/proc/{pid}/fd/{ready['fs_fd']}"
    return accounting.Target(pid, path, cgroups.version, fs_path)


def _apply_result(record: Message, result: Message) -> None:
    """Copy the child's outcome (errno / error / detail) into the record."""
    detail = record["detail"]
    detail.update(result.get("detail") or {})
    status = result.get("status")
    if status == "errno":
        record["errno"] = result.get("errno")
        detail["errno_message"] = result.get("error")
        if "failed_step" in result:
            detail["failed_step"] = result["failed_step"]
    elif status != "ok":
        record["error"] = result.get("error") or f"unexpected result {result!r}"


def _measure_extras(record: Message, target: accounting.Target) -> None:
    """Helper-process metrics (memfd-2proc) and the backing filesystem's size."""
    detail = record["detail"]
    helper = detail.get("grandchild_pid")
    if isinstance(helper, int):
        metrics = accounting.read_process(helper)
        detail["grandchild"] = {k: metrics[k] for k in HELPER_METRICS if k in metrics}
    if target.fs_path:
        with contextlib.suppress(OSError):
            detail["fs_total_bytes"] = accounting.statvfs_total(target.fs_path)


def _cleanup(child: Child, settings: Settings, cgroup_dir: str | None, record: Message) -> None:
    """Kill and reap the process group, remove the named file and the cgroup."""
    left = kill_group(child.pid, settings.subreaper)
    child.close()
    if left:
        record["detail"]["leftover_pids"] = left
        record["error"] = record["error"] or f"processes left in the group: {left}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(named_shm_path(settings, record["name"]))
    if cgroup_dir:
        problem = system.remove_cgroup(cgroup_dir)
        if problem:
            record["detail"]["cgroup_cleanup_error"] = problem
