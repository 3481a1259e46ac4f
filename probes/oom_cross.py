"""oom-memcg-cross-charge: a memfd written in memory cgroup A, used from cgroup B.

Under one parent P (``kmx-<name>``, +memory) two v2 cgroups: A with memory.max, B
without. A ``creator`` in A writes half of A's limit into a memfd, passes it over
SCM_RIGHTS to the ``receiver`` in B and exits. The receiver appends a quarter of the
limit (pages it allocates: charged to B), then maps and touches the whole file. A ``hog``
in A then allocates until A's memory cgroup runs out. Recorded at each stage: A's, B's
and P's memory.current and memory.stat shmem, and the receiver's RssShmem; at the end
A is removed and P's charge read again, to see where A's share of the memfd went.

mm/memcontrol.c charges a shmem page to the memcg of the task that allocates it and
never moves it when another task maps it or when the allocator exits; memcg OOMs pick
victims inside the OOMing memcg only (mm/oom_kill.c select_bad_process via
mem_cgroup_scan_tasks), so the receiver in B is never a candidate for A's OOM.
"""

from __future__ import annotations

import os
import socket
import time

import oom_model
import system
from messages import ProtocolError
from oom import Emit, Env, Experiment, Record
from oom_harness import Role, kill_all, spawn_all
from oom_judge import judge, outcome, shmem_restored
from oom_repeat import armed, new_record
from oom_roles import RoleSpec
from oom_scope import Scope, Unavailable, enable_v2_memory, memory_cgroups
from oom_watch import watch
from system import write_text


def _make_scopes(root: str, name: str, limit: int) -> tuple[Scope, Scope, Scope]:
    """(P, A, B): P has +memory for its children, A memory.max = ``limit``."""
    enable_v2_memory(root)
    parent = os.path.join(root, f"kmx-{name}")
    for path in (os.path.join(parent, "a"), os.path.join(parent, "b"), parent):
        system.remove_cgroup(path)
    try:
        os.mkdir(parent)
        write_text(os.path.join(parent, "cgroup.subtree_control"), "+memory")
        os.mkdir(os.path.join(parent, "a"))
        os.mkdir(os.path.join(parent, "b"))
        write_text(os.path.join(parent, "a", "memory.max"), str(limit))
    except OSError as exc:
        _remove(parent)
        raise Unavailable(f"cannot set up the v2 cgroups under {parent}: {exc}") from None
    a = Scope("v2", os.path.join(parent, "a"), limit)
    return Scope("v2", parent), a, Scope("v2", os.path.join(parent, "b"))


def _remove(parent: str) -> str | None:
    problems = [system.remove_cgroup(os.path.join(parent, c)) for c in ("a", "b")]
    problems.append(system.remove_cgroup(parent))
    return "; ".join(p for p in problems if p) or None


def _charges(scopes: dict[str, Scope]) -> dict[str, dict[str, int | None]]:
    return {k: {"current": s.current(), "shmem": s.stat("shmem")} for k, s in scopes.items()}


def _stage(scopes: dict[str, Scope], receiver: Role) -> Record:
    """One reading of every cgroup's charge and of the receiver's RSS."""
    snap = oom_model.snapshot(receiver.pid) or {}
    return {"cgroups": _charges(scopes), "receiver_RssShmem": snap.get("RssShmem")}


def _specs(env: Env, a: Scope, b: Scope, sizes: dict[str, int]) -> list[RoleSpec]:
    """receiver (B), creator (A), hog (A): the hog last, as the driver of the repeat."""
    one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    extra = sizes["holder"] // 2
    return [
        RoleSpec("receiver", "fd-receive-grow", 0, env.role_adj, b.procs, sock=two, extra=extra),
        RoleSpec("creator", "fd-create", sizes["holder"], env.role_adj, a.procs, sock=one),
        RoleSpec("hog", "hog", sizes["hog"], env.role_adj, a.procs),
    ]


def _wait_exit(pid: int, deadline: float) -> None:
    """Reap the creator, which exits right after handing over the memfd."""
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return
        time.sleep(0.01)
    raise ProtocolError("the creator did not exit after passing the memfd")


def _remove_a(rec: Record, parent: Scope, a: Scope) -> None:
    """rmdir A (nothing runs in it now) and read P's charge before and after."""
    cross = rec["cross"]
    cross["parent_before_rmdir"] = _charges({"parent": parent})["parent"]
    cross["rmdir_a"] = system.remove_cgroup(a.path or "") or "ok"
    cross["memory_cgroups_after_rmdir"] = memory_cgroups()  # a dying A still counts here
    cross["parent_after_rmdir"] = _charges({"parent": parent})["parent"]


def _run(rec: Record, env: Env, emit: Emit, start: float) -> list[Role]:
    parent, a, b = _make_scopes(env.cgroup_root, rec["name"], rec["sizes"]["limit"])
    rec["cgroup"].update(version="v2", path=a.path, limit=a.limit, shmem_baseline=a.stat("shmem"))
    scopes = {"a": a, "b": b, "parent": parent}
    rec["cross"] = {"before": _charges(scopes)}
    roles: list[Role] = []
    try:
        roles = spawn_all(_specs(env, a, b, rec["sizes"]), env, start + env.timeout)
        _wait_exit(roles[1].pid, start + env.timeout)
        roles[1].alive = False
        rec["cross"]["receiver"] = roles[0].ready
        rec["cross"]["after_handover"] = _stage(scopes, roles[0])
        armed(rec, roles, a, emit, env)
        seen = watch(roles, start, start + env.timeout, go=True)
        outcome(rec, seen, roles, a)
        rec["cross"]["after_oom"] = _stage(scopes, roles[0])
        _remove_a(rec, parent, a)
    finally:
        kill_all(roles)
        problem = _remove(parent.path or "")
        if problem:
            rec["cgroup"]["cleanup_error"] = problem
    return roles


def run_repeat(exp: Experiment, repeat: int, env: Env, emit: Emit) -> Record:
    """One repeat of oom-memcg-cross-charge, end to end; never raises."""
    start = time.monotonic()
    rec = new_record(exp, repeat, env)
    try:
        _run(rec, env, emit, start)
        handed = (rec["cross"].get("after_handover") or {}).get("cgroups", {}).get("a", {})
        base = rec["cgroup"].get("shmem_baseline") or 0
        if isinstance(handed.get("shmem"), int):
            # A's share stays with A once its creator is gone: charged at allocation.
            rec["cross"]["a_kept_charge"] = handed["shmem"] - base >= rec["sizes"]["holder"] // 2
        judge(rec)
    except Unavailable as exc:
        rec.update(status="not available", error=str(exc))
    except (ProtocolError, OSError, ValueError) as exc:
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}")
    shmem_restored(rec)
    rec["duration_s"] = round(time.monotonic() - start, 3)
    return rec
