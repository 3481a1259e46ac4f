"""One repeat of one OOM experiment, end to end, and its ``oom`` records.

The scope (oom_scope.py) first, then the roles (oom_harness.py); the ``start`` record is
emitted and drained before the driver gets ``go``; then the harness watches
(oom_watch.py), judges (oom_judge.py), restores the knobs it set and cleans up.
:func:`run_repeat` never raises: what went wrong is the record's ``status`` and ``error``.
"""

from __future__ import annotations

import contextlib
import os
import time

import knobs
import oom_growth
import oom_scope
import swap
import system
import wire
from accounting import read_int
from messages import ProtocolError
from oom import Emit, Env, Experiment, Record, in_container, role_sizes
from oom_harness import Role, kill_all, named_file, role_specs, spawn_all
from oom_judge import check_container_restored, judge, outcome, predict, shmem_restored
from oom_watch import shmem, swap_used, vmstat_oom_kill, watch

#: The role whose memory the experiment is about, where it is not called "holder".
_HOLDER_ROLE = {"memfd-grow": "writer", "cross": "receiver"}


def new_record(exp: Experiment, repeat: int, env: Env) -> Record:
    """A repeat's result record before anything ran: the experiment, sizes, knobs, baselines."""
    return {
        "type": "oom", "event": "result", "name": exp.name, "repeat": repeat,
        "status": "ok", "error": None, "scope": exp.scope, "group": exp.group,
        "writer_protected": exp.writer_protected,
        # A growth writer alive without progress for this long counts as stalled: a
        # knob of the harness that decides writer-stalled against a later write() error.
        "stall_after_s": oom_growth.STALL_S if exp.growth else None,
        "holder_role": _HOLDER_ROLE.get(exp.holder, "holder"),
        "mem_total": env.mem_total, "sizes": role_sizes(exp, env), "knobs": knobs.oom_knobs(),
        "memcg": env.memcg if exp.scope != "global" else None,
        "oom_score_adj": {"harness": _own_adj(), "roles": env.role_adj},
        # The kernel names the task whose allocation invoked each OOM: the harness's own
        # page faults (after a kill, before the victim's memory is freed) can be one.
        "harness_pid": os.getpid(),
        "shmem": {"baseline": shmem(), "swap_baseline": swap_used()}, "cgroup": {},
        "vmstat_oom_kill": None,
    }  # fmt: skip


def make_scope(exp: Experiment, env: Env, limit: int | None) -> oom_scope.Scope:
    """Where the OOM happens: the container's cgroup, a fresh v2 / v1 cgroup, or globally."""
    if in_container(exp, env):
        return oom_scope.make_container(
            env.cgroup_root, exp.scope, exp.group, env.harness_protected
        )
    if exp.scope == "v2":
        assert limit is not None
        return oom_scope.make_v2(env.cgroup_root, exp.name, limit, exp.group)
    if exp.scope == "v1":
        assert limit is not None
        return oom_scope.make_v1(exp.name, limit)
    return oom_scope.Scope()


def armed(rec: Record, roles: list[Role], scope: oom_scope.Scope, emit: Emit, env: Env) -> None:
    """Record the set-up and tell the host the pids before anything can go wrong."""
    rec["pids"] = {r.name: r.pid for r in roles}
    # The knobs in force while the driver runs ("knobs" is what they were before the repeat
    # set any: the kill-allocating experiment sets vm.oom_kill_allocating_task=1 here).
    rec["knobs_during"] = knobs.oom_knobs()
    rec["shmem"]["armed"] = shmem()
    rec["cgroup"]["current_armed"] = scope.current()
    rec["cgroup"]["shmem_armed"] = scope.stat("shmem")
    emit(
        {
            "type": "oom",
            "event": "start",
            "name": rec["name"],
            "repeat": rec["repeat"],
            "pids": rec["pids"],
            "harness_pid": rec["harness_pid"],
            "holder_role": rec.get("holder_role"),
            "mem_total": env.mem_total,
            "uptime": system.uptime(),
        }
    )
    wire.drain(env.out_fd)  # the next thing may be a panic: the start record must be out


def finish(
    rec: Record, roles: list[Role], scope: oom_scope.Scope, exp: Experiment, env: Env
) -> None:
    """Kill what is left, judge the repeat, restore knobs, clean up."""
    kill_all(roles)
    judge(rec)
    cg = rec["cgroup"]
    if scope.path:
        cg["current_after_exit"] = scope.current()
    if exp.kill_allocating:
        try:
            knobs.set_sysctl(
                "vm/oom_kill_allocating_task", rec["knobs"]["oom_kill_allocating_task"]
            )
        except OSError as exc:
            rec["restore_error"] = f"vm.oom_kill_allocating_task: {exc}"
    if exp.holder == "shm-named":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(named_file(exp, env))
    problem = oom_scope.release(scope)
    if problem:
        cg["cleanup_error"] = problem
    if not scope.owned:
        check_container_restored(cg, scope)
    shmem_restored(rec)


def run_repeat(exp: Experiment, repeat: int, env: Env, emit: Emit) -> Record:
    """One repeat of one experiment, end to end; never raises. Swap experiments swap the
    guest's swap disk on first and off again at the end."""
    problem = swap.swapon(env.swap_dev) if exp.swapped else None
    if problem:
        unavailable = new_record(exp, repeat, env)
        unavailable.update(status="not available", error=problem)
        return unavailable
    rec: Record = {}
    try:
        rec = _run_repeat(exp, repeat, env, emit)
        return rec
    finally:
        problem = swap.swapoff(env.swap_dev) if exp.swapped else None
        if problem:  # swap left on would change every later experiment: say so
            rec["swapoff_error"] = problem


def _run_repeat(exp: Experiment, repeat: int, env: Env, emit: Emit) -> Record:
    start = time.monotonic()
    rec = new_record(exp, repeat, env)
    oom_before = vmstat_oom_kill()
    try:
        scope = make_scope(exp, env, rec["sizes"].get("limit"))
    except oom_scope.Unavailable as exc:
        rec.update(status="not available", error=str(exc))
        return rec
    rec["cgroup"].update(version=scope.version, path=scope.path, limit=scope.limit)
    rec["cgroup"].update(scope.facts, shmem_baseline=scope.stat("shmem"))
    if not scope.owned:
        rec["cgroup"]["events_before"] = scope.events()
    roles: list[Role] = []
    try:
        deadline = start + env.timeout
        roles = spawn_all(role_specs(exp, env, scope, rec["sizes"]), env, deadline)
        rec["t_ready"] = round(time.monotonic() - start, 3)
        if exp.kill_allocating:
            knobs.set_sysctl("vm/oom_kill_allocating_task", 1)
        armed(rec, roles, scope, emit, env)
        stall_s = rec["stall_after_s"]
        seen = watch(roles, start, deadline, harness=not scope.owned, stall_s=stall_s, go=True)
        predict(rec, seen.snapshot, scope, env)
        outcome(rec, seen, roles, scope)
    except (ProtocolError, OSError, ValueError) as exc:
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        rec["t_watched"] = round(time.monotonic() - start, 3)
        finish(rec, roles, scope, exp, env)
    after = vmstat_oom_kill()
    if oom_before is not None and after is not None:
        rec["vmstat_oom_kill"] = after - oom_before
    rec["duration_s"] = round(time.monotonic() - start, 3)
    return rec


def _own_adj() -> int | None:
    return read_int("/proc/self/oom_score_adj")
