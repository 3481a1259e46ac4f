"""The roles of an OOM repeat as the harness sees them: which to fork, forking them into one
process group, waiting until each is ready, and killing and reaping them.

The role processes themselves are oom_roles.py; the last role forked is the driver (the
hog, or the memfd writer), which is told ``go``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import oom_growth
import oom_scope
from messages import Channel, ProtocolError
from oom import Env, Experiment, Record
from oom_roles import OOM_SCORE_ADJ_MIN, RoleSpec, role_main

#: How long to wait for a role that died (pipe EOF) to become a zombie: its files,
#: a memfd among them, are released before that (do_exit: exit_files, exit_task_work).
REAP_S = 2.0


@dataclass
class Role:
    """A forked role as the harness sees it."""

    name: str
    pid: int
    cmd_w: int
    channel: Channel
    ready: Record = field(default_factory=dict)
    alive: bool = True


def named_file(exp: Experiment, env: Env) -> str:
    """The shm-named holder's file in shm_dir (removed by the harness after the repeat)."""
    return os.path.join(env.shm_dir, f"kmx-{exp.name}-{os.getpid()}")


def role_specs(
    exp: Experiment, env: Env, scope: oom_scope.Scope, sizes: dict[str, int]
) -> list[RoleSpec]:
    """holder (+ fd-passed creator), bystander and hog, or the growth roles, in fork order."""
    adj = env.role_adj if exp.killable else OOM_SCORE_ADJ_MIN
    # The container's own cgroup: forked roles are in it already (and it is read-only).
    procs = scope.procs if scope.owned else None
    if exp.growth:
        writer_adj = OOM_SCORE_ADJ_MIN if exp.writer_protected else adj
        return oom_growth.role_specs(sizes, adj, writer_adj, procs)
    holder_path = {"tmpfile-shm": env.shm_dir, "shm-named": named_file(exp, env)}.get(exp.holder)
    specs: list[RoleSpec] = []
    if exp.holder == "fd-passed":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        specs.append(RoleSpec("holder", "fd-receive", 0, adj, procs, sock=b))
        specs.append(RoleSpec("creator", "fd-create", sizes["holder"], adj, procs, sock=a))
    else:
        specs.append(RoleSpec("holder", exp.holder, sizes["holder"], adj, procs, holder_path))
    if exp.killable:
        specs.append(RoleSpec("bystander", "anon", sizes["bystander"], adj, procs))
    specs.append(RoleSpec("hog", "hog", sizes["hog"], adj, procs))
    return specs


def _fork(spec: RoleSpec, pgid: int, inherited: list[int]) -> Role:
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    spec.pgid = pgid
    spec.close_fds = [cmd_w, res_r, *inherited]
    pid = os.fork()
    if pid == 0:
        role_main(spec, cmd_r, res_w)
    os.close(cmd_r)
    os.close(res_w)
    with contextlib.suppress(OSError):  # the child may have done it already
        os.setpgid(pid, pgid or pid)
    return Role(spec.role, pid, cmd_w, Channel(res_r))


def spawn_all(specs: list[RoleSpec], env: Env, deadline: float) -> list[Role]:
    """Fork every role into one process group, then wait for each to be ready.

    All roles are forked before any is awaited: fd-passed's holder is ready only once
    the creator (forked after it) has sent the memfd.
    """
    roles: list[Role] = []
    pgid = 0
    try:
        for spec in specs:
            inherited = [env.out_fd] + [fd for r in roles for fd in (r.cmd_w, r.channel.fd)]
            inherited += [s.sock.fileno() for s in specs if s.sock is not None and s is not spec]
            roles.append(_fork(spec, pgid, inherited))
            pgid = pgid or roles[0].pid
        for spec in specs:
            if spec.sock is not None:
                spec.sock.close()
        for role in roles:
            role.ready = role.channel.receive(deadline, f"{role.name} ready")
            if not role.ready.get("ready"):
                raise ProtocolError(str(role.ready.get("error") or f"{role.name} failed to start"))
    except BaseException:
        # The caller never sees these roles: kill them here, or they keep their memory (and
        # the cgroup) for the rest of the boot.
        kill_all(roles)
        raise
    return roles


def _waitpid(pid: int, patience: float) -> tuple[int, int]:
    """waitpid WNOHANG, retried for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        found = os.waitpid(pid, os.WNOHANG)
        if found[0] or time.monotonic() >= deadline:
            return found
        time.sleep(0.01)


def exit_signals(roles: list[Role], dead: Sequence[str] = ()) -> dict[str, str]:
    """How each exited role ended (SIGKILL = the OOM killer), reaping it.

    Roles in ``dead`` closed their pipe: they are waited for (REAP_S), so that what they
    held is released before the harness reads Shmem again."""
    ends = {}
    for role in roles:
        try:
            pid, status = _waitpid(role.pid, REAP_S if role.name in dead else 0)
        except ChildProcessError:
            continue
        if pid == 0:
            continue
        role.alive = False
        if os.WIFSIGNALED(status):
            ends[role.name] = signal.Signals(os.WTERMSIG(status)).name
        else:
            ends[role.name] = f"exit {os.WEXITSTATUS(status)}"
    return ends


def kill_all(roles: list[Role]) -> None:
    """SIGKILL the repeat's process group and every role, and reap them."""
    if roles:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(roles[0].pid, signal.SIGKILL)
    for role in roles:
        with contextlib.suppress(ProcessLookupError):
            os.kill(role.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(role.pid, 0)
        for fd in (role.cmd_w, role.channel.fd):
            with contextlib.suppress(OSError):
                os.close(fd)
