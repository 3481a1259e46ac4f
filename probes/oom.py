"""OOM experiments: whom does the OOM killer kill when memory sits in memfd and tmpfs?

Each repeat of an experiment forks its roles (``holder``, ``bystander``, ``hog``) into
one process group, emits an ``oom`` ``start`` record naming their pids (drained to the
wire before the OOM, so even a panic leaves it behind), lets the hog allocate until the
kernel acts, watches who dies in which order, cleans up and checks that Shmem is back at
its baseline before the next repeat. The harness itself runs with oom_score_adj -1000.
Sizes are fractions of MemTotal (or of the cgroup limit), so they mean the same at any
guest size. The kernel's own account (Killed process lines) is parsed on the host from
the console; the record carries what only the guest can see.

In a container (``Env.memcg == "container"``) the memcg experiments run in the
container's own memory cgroup, and a harness that cannot lower its oom_score_adj raises
every role's instead (:data:`CONTAINER_ROLE_ADJ`); see :func:`run_plan`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import knobs
import oom_model
import oom_scope
import swap
from accounting import parse_flat_keyed, read_int, read_meminfo, read_text
from oom_roles import OOM_SCORE_ADJ_MIN, OOM_SCORE_ADJ_NEUTRAL, RoleSpec, role_main
from protocol import Channel, ProtocolError
from system import write_text

Record = dict[str, Any]
Emit = Callable[[Record], None]

# Sizes are fractions of MemAvailable at the start of each repeat (the guest's memory
# minus the userland in rootfs and the harness), chosen so the roles keep their order at
# any guest size: a mapped holder (half) > the hog (what is left, ~40 %) > the bystander.
HOLDER_FRACTION = 0.50  # the holder's file, of MemAvailable (global) or of the limit
BYSTANDER_FRACTION = 0.04  # of MemAvailable (global) or of the limit (memcg)
# memory.max, of MemAvailable: a fraction of MemTotal would let the global limit hit
# first in a small guest (the userland alone is ~36 MiB of rootfs Shmem).
MEMCG_LIMIT_FRACTION = 0.50
HOG_CAP_FACTOR = 2  # the hog stops (and says so) after 2x MemTotal: no OOM happened
SETTLE_S = 0.15  # after the hog died: time for group kills / reaping to finish
#: A writer that has not reported progress for this long while alive is stalled: under
#: TCG a 4 MiB step takes ~50 ms and a kill, reaper included, well under 0.5 s. Seen on
#: 6.12: a protected writer in a full memory cgroup with nothing killable re-enters the
#: memcg OOM killer from every page fault (thousands of "no killable processes" reports)
#: and never returns.
STALL_S = 1.5
#: How long to wait for a role that died (pipe EOF) to become a zombie: its files,
#: a memfd among them, are released before that (do_exit: exit_files, exit_task_work).
REAP_S = 2.0
SHMEM_TOLERANCE = 4 << 20
RESTORE_TIMEOUT = 3.0
#: The container's memory.stat shmem must come back this close to its baseline.
CGROUP_SHMEM_TOLERANCE = 4 << 20
#: oom_score_adj of every role when the harness cannot go to -1000 (no CAP_SYS_RESOURCE:
#: raising one's own adjustment needs no privilege, lowering it below the value the
#: process started with does). mm/oom_kill.c oom_badness() adds adj * totalpages / 1000
#: to every role alike, so their order is the same as at adj 0, while each role scores
#: at least totalpages / 2 above its RSS: the harness (adj 0, ~10 MiB RSS) is never
#: preferred over them. For a memcg OOM constrained_alloc() sets totalpages to
#: mem_cgroup_get_max() -- the cgroup's own limit (+ swap, none here), on v1 and v2
#: alike -- so the offset is half the container's limit, not half the host's RAM.
CONTAINER_ROLE_ADJ = 500


@dataclass(frozen=True)
class Experiment:
    """One OOM experiment: how the holder keeps its memory, and where the OOM happens.

    ``holder`` "memfd-grow" has no holder and no hog: a ``writer`` grows an unmapped memfd
    until the kernel acts, among three bystanders holding anon memory; "cross" is
    oom-memcg-cross-charge (oom_cross.py).
    """

    name: str
    holder: str  # memfd-write | memfd-mapped | tmpfile-shm | shm-named | fd-passed | memfd-grow
    scope: str = "global"  # global | v2 | v1
    group: bool = False  # memory.oom.group=1
    killable: bool = True  # False: every role runs at oom_score_adj -1000
    writer_protected: bool = False  # memfd-grow: the writer runs at oom_score_adj -1000
    kill_allocating: bool = False  # vm.oom_kill_allocating_task=1 during the repeat
    swapped: bool = False  # swap on for the repeat; the holder pushes its memfd out to it

    @property
    def growth(self) -> bool:
        """The memfd itself is the pressure (a writer, no hog)."""
        return self.holder == "memfd-grow"


#: In run order. oom-memcg-v1 comes first (the v1 controller can only be taken before v2
#: used it, see oom_scope) and oom-no-killable last (it ends the boot with a panic).
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment("oom-memcg-v1", "memfd-write", "v1"),
        Experiment("oom-global-memfd-unmapped", "memfd-write"),
        Experiment("oom-global-memfd-mapped", "memfd-mapped"),
        Experiment("oom-global-tmpfile-shm", "tmpfile-shm"),
        Experiment("oom-global-shm-named", "shm-named"),
        Experiment("oom-global-fd-passed", "fd-passed"),
        Experiment("oom-global-memfd-swapped", "memfd-swapped", swapped=True),
        Experiment("oom-global-memfd-growth", "memfd-grow"),
        Experiment("oom-global-memfd-growth-kill-allocating", "memfd-grow", kill_allocating=True),
        Experiment("oom-memcg-v2", "memfd-write", "v2"),
        Experiment("oom-memcg-v2-group", "memfd-write", "v2", group=True),
        Experiment("oom-memcg-v2-memfd-growth", "memfd-grow", "v2"),
        Experiment(
            "oom-memcg-v2-memfd-growth-protected", "memfd-grow", "v2", writer_protected=True
        ),
        Experiment("oom-memcg-cross-charge", "cross", "v2"),
        # Both end in a panic ("no killable processes" once the bystanders are gone):
        # last, so that each costs one boot per repeat and nothing else.
        Experiment("oom-global-memfd-growth-protected", "memfd-grow", writer_protected=True),
        Experiment("oom-no-killable", "memfd-write", killable=False),
    )
}

#: Bystanders of the memfd-growth experiments: anon memory, as fractions of MemAvailable
#: (global) or of the limit (memcg). Every role shares the interpreter's pages with the
#: harness (in its RSS, not charged to its cgroup); beyond them the writer holds only its
#: 2 MiB write buffer, so each bystander's anon memory must clearly exceed that: in a
#: 192M guest 8-16 MiB globally, 7-12 MiB in the memory cgroup.
GROWTH_BYSTANDERS = {"bystander-1": 0.10, "bystander-2": 0.15, "bystander-3": 0.20}
GROWTH_BYSTANDERS_MEMCG = {"bystander-1": 0.15, "bystander-2": 0.20, "bystander-3": 0.25}
#: memory.max of the memcg growth experiments, of MemAvailable: room for the bystanders,
#: the roles' own pages and some memfd before the first OOM.
GROWTH_LIMIT_FRACTION = 0.60


@dataclass(frozen=True)
class Env:
    """Probe-wide facts and settings for the experiments."""

    mem_total: int
    page_size: int
    shm_dir: str
    cgroup_root: str
    timeout: float
    out_fd: int
    memcg: str = "new"  # new: a fresh child cgroup per repeat | container: our own cgroup
    role_adj: int = OOM_SCORE_ADJ_NEUTRAL  # killable roles' oom_score_adj
    harness_protected: bool = True  # the harness runs at oom_score_adj -1000
    swap_dev: str | None = None  # the guest's swap disk, on only during swap experiments


def parse_plan(spec: str, repeats: int) -> list[tuple[str, int]]:
    """``all`` or ``name[:first-last],...`` -> (experiment, repeat index) units in run order.

    Unknown names raise ValueError naming the valid ones.
    """
    if spec.strip() == "all":
        return [(name, r) for name in EXPERIMENTS for r in range(repeats)]
    wanted: dict[str, list[int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, span = item.partition(":")
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown OOM experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
        first, _, last = span.partition("-")
        lo = int(first) if first else 0
        hi = int(last) if last else (lo if first else repeats - 1)
        wanted.setdefault(name, []).extend(range(lo, hi + 1))
    return [(name, r) for name in EXPERIMENTS for r in sorted(set(wanted.get(name, [])))]


# ---- one repeat ------------------------------------------------------------------------


@dataclass
class Role:
    """A forked role as the harness sees it."""

    name: str
    pid: int
    cmd_w: int
    channel: Channel
    ready: Record = field(default_factory=dict)
    alive: bool = True


def _sizes(exp: Experiment, env: Env) -> dict[str, int]:
    """Bytes per role (and the cgroup limit), from MemAvailable right now.

    In the container's own cgroup they are fractions of its limit instead: MemTotal and
    MemAvailable there are the host's.
    """
    limit = oom_scope.container_limit(env.cgroup_root) if _in_container(exp, env) else None
    if limit is not None:
        return container_sizes(limit)
    available = read_meminfo().get("meminfo_MemAvailable", env.mem_total // 2)
    limit_fraction = GROWTH_LIMIT_FRACTION if exp.growth else MEMCG_LIMIT_FRACTION
    base = available if exp.scope == "global" else int(available * limit_fraction)
    sizes = {"mem_available": available}
    if exp.growth:
        fractions = GROWTH_BYSTANDERS if exp.scope == "global" else GROWTH_BYSTANDERS_MEMCG
        sizes |= {role: int(base * f) for role, f in fractions.items()}
        sizes["writer"] = HOG_CAP_FACTOR * (env.mem_total if exp.scope == "global" else base)
    else:
        sizes |= {
            "holder": int(base * HOLDER_FRACTION),
            "bystander": int(base * BYSTANDER_FRACTION),
            "hog": HOG_CAP_FACTOR * env.mem_total,
        }
    if exp.scope != "global":
        sizes["limit"] = base
    return sizes


def container_sizes(limit: int) -> dict[str, int]:
    """Role sizes as fractions of the container's memory limit; the hog stops at 2x it
    (the limit, not the host's RAM, bounds what it may need)."""
    return {
        "limit": limit,
        "holder": int(limit * HOLDER_FRACTION),
        "bystander": int(limit * BYSTANDER_FRACTION),
        "hog": HOG_CAP_FACTOR * limit,
    }


def _in_container(exp: Experiment, env: Env) -> bool:
    return env.memcg == "container" and exp.scope != "global"


def _make_scope(exp: Experiment, env: Env, limit: int | None) -> oom_scope.Scope:
    if _in_container(exp, env):
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


def _role_specs(
    exp: Experiment, env: Env, scope: oom_scope.Scope, sizes: dict[str, int]
) -> list[RoleSpec]:
    """holder (+ fd-passed creator), bystander and hog, in fork order."""
    adj = env.role_adj if exp.killable else OOM_SCORE_ADJ_MIN
    # The container's own cgroup: forked roles are in it already (and it is read-only).
    procs = scope.procs if scope.owned else None
    holder_path = {
        "tmpfile-shm": env.shm_dir,
        "shm-named": os.path.join(env.shm_dir, f"kmx-{exp.name}-{os.getpid()}"),
    }.get(exp.holder)
    specs = []
    if exp.growth:
        specs = [RoleSpec(r, "anon", sizes[r], adj, procs) for r in GROWTH_BYSTANDERS]
        writer_adj = OOM_SCORE_ADJ_MIN if exp.writer_protected else adj
        return [*specs, RoleSpec("writer", "memfd-grow", sizes["writer"], writer_adj, procs)]
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


def _spawn_all(specs: list[RoleSpec], env: Env, deadline: float) -> list[Role]:
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
        _kill_all(roles)
        raise
    return roles


def _snapshot_all(roles: list[Role], harness: bool = False) -> dict[str, dict[str, int]] | None:
    """/proc values of every role (and of the harness when it shares their cgroup, as it
    does in a container: it is then an OOM candidate too); None if one is gone."""
    snaps = {}
    pids = [(r.name, r.pid) for r in roles if r.name != "creator"]
    for name, pid in pids + ([("harness", os.getpid())] if harness else []):
        snap = oom_model.snapshot(pid)
        if snap is None:
            return None
        snaps[name] = snap
    return snaps


def vmstat_oom_kill() -> int | None:
    """The system-wide oom_kill counter of /proc/vmstat (4.13+)."""
    try:
        return parse_flat_keyed(read_text("/proc/vmstat")).get("oom_kill")
    except OSError:
        return None


def uptime() -> float | None:
    """Seconds since boot (/proc/uptime), to time the boot and each repeat."""
    try:
        return float(read_text("/proc/uptime").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def shmem() -> int:
    """meminfo Shmem in bytes."""
    return read_meminfo().get("meminfo_Shmem", 0)


def swap_used() -> int:
    """SwapTotal - SwapFree in bytes: a swapped-out memfd page leaves Shmem for here."""
    return read_meminfo().get("meminfo_SwapUsed", 0)


@dataclass
class Watch:
    """What the harness saw while the driver (the hog, or the memfd writer) ran."""

    #: {"role", "t", "shmem", "mem_available"} in the order seen: meminfo read right after
    #: the harness saw the death (what that kill gave back, or did not).
    deaths: list[Record] = field(default_factory=list)
    snapshot: dict[str, dict[str, int]] | None = None  # last complete one before a death
    hog_bytes: int = 0  # bytes the driver allocated or wrote (last progress line)
    #: hog-died | hog-done (no OOM) | writer-died | writer-done | write-error | timeout
    outcome: str = "timeout"
    write_error: str | None = None  # the writer's errno name, when a write() failed
    stall: Record | None = None  # the driver went quiet while alive: what it was doing


def _on_message(message: Record, roles: list[Role], watch: Watch, harness: bool) -> bool:
    """Handle one driver message; True when the driver stopped without being killed."""
    if "progress" in message:
        watch.hog_bytes = int(message["progress"])
        if not watch.deaths:
            watch.snapshot = _snapshot_all(roles, harness) or watch.snapshot
    if "write_error" in message:
        watch.write_error = str(message["write_error"])
        watch.outcome = "write-error"
        return True
    if "done" in message:
        watch.outcome = f"{roles[-1].name}-done"
        return True
    return False


def _death(role: Role, start: float) -> Record:
    info = read_meminfo()
    return {
        "role": role.name,
        "t": round(time.monotonic() - start, 3),
        "shmem": info.get("meminfo_Shmem"),
        "mem_available": info.get("meminfo_MemAvailable"),
    }


def _read_lines(role: Role) -> list[Record] | None:
    """Messages now readable from a role; None at EOF (the process has exited)."""
    data = os.read(role.channel.fd, 65536)
    if not data:
        return None
    role.channel.buffer += data
    *lines, role.channel.buffer = role.channel.buffer.split(b"\n")
    return [json.loads(line) for line in lines if line]


def watch(
    roles: list[Role], start: float, deadline: float, harness: bool = False,
    stall_s: float | None = None,
) -> Watch:  # fmt: skip
    """Follow the driver's progress (snapshotting /proc per chunk) and every role's death.

    The driver is the last role (the hog, or the memfd writer); the repeat ends shortly
    after it dies or stops. ``harness``: include the harness in the snapshots (it shares
    the roles' cgroup)."""
    result = Watch()
    live = {r.channel.fd: r for r in roles if r.name != "creator"}
    driver = roles[-1]
    stop_at, heard = deadline, time.monotonic()
    while live:
        now = time.monotonic()
        if now >= stop_at:
            break
        if stall_s and driver.alive and now - heard > stall_s:
            result.outcome, result.stall = (
                f"{driver.name}-stalled",
                stall_evidence(driver, now - heard),
            )
            break
        wait = min(stop_at, heard + stall_s) - now if stall_s else stop_at - now
        for fd in select.select(list(live), [], [], max(wait, 0.01))[0]:
            role = live[fd]
            messages = _read_lines(role)
            if role is driver:
                heard = time.monotonic()
            if messages is None:
                role.alive = False
                del live[fd]
                result.deaths.append(_death(role, start))
                if role is driver and result.outcome == "timeout":
                    result.outcome = f"{driver.name}-died"
                    stop_at = time.monotonic() + SETTLE_S
            elif any(_on_message(m, roles, result, harness) for m in messages):
                stop_at = time.monotonic()
    return result


def stall_evidence(role: Role, quiet_s: float) -> Record:
    """What a stalled driver is doing: its state, system call and wait channel."""
    found: Record = {"no_progress_s": round(quiet_s, 2)}
    for name in ("stat", "syscall", "wchan"):
        try:
            text = read_text(f"/proc/{role.pid}/{name}")
        except OSError:
            continue
        if name == "stat":  # "pid (comm) S ...": the state letter follows the comm
            found["state"] = text.rpartition(")")[2].split()[0]
        else:
            found[name] = text.split()[0] if text.split() else ""
    return found


def _waitpid(pid: int, patience: float) -> tuple[int, int]:
    """waitpid WNOHANG, retried for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        found = os.waitpid(pid, os.WNOHANG)
        if found[0] or time.monotonic() >= deadline:
            return found
        time.sleep(0.01)


def _exit_signals(roles: list[Role], dead: Sequence[str] = ()) -> dict[str, str]:
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


def _kill_all(roles: list[Role]) -> None:
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


def wait_shmem(baseline: int, timeout: float = RESTORE_TIMEOUT) -> int:
    """Poll meminfo Shmem until it is back within tolerance of ``baseline``; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = shmem()
        if value <= baseline + SHMEM_TOLERANCE or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# ---- the repeat as a whole -------------------------------------------------------------


def _predict(
    rec: Record, snaps: dict[str, dict[str, int]] | None, scope: oom_scope.Scope, env: Env
) -> None:
    """The badness model's victim from the last /proc snapshot before the first death."""
    rec["pre_oom"] = snaps
    if not snaps:
        return
    total = (scope.limit or env.mem_total) // env.page_size
    victim, points = oom_model.predict(snaps, total, env.page_size)
    rec.update(predicted_victim=victim, model_points=points)
    rec["predicted_by_oom_score"] = oom_model.by_oom_score(snaps)


def _armed(rec: Record, roles: list[Role], scope: oom_scope.Scope, emit: Emit, env: Env) -> None:
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
            "holder_role": rec.get("holder_role"),
            "mem_total": env.mem_total,
            "uptime": uptime(),
        }
    )
    # The next thing may be a panic: make sure the start record has left the guest.
    # termios.error is not an OSError. A virtio-serial port (arm64) is no tty and has
    # nothing to drain: under TCG its virtqueue kick traps into QEMU, which writes the
    # bytes to the host file before the guest's write() returns.
    import termios

    with contextlib.suppress(OSError, termios.error):
        termios.tcdrain(env.out_fd)


def _outcome(rec: Record, seen: Watch, roles: list[Role], scope: oom_scope.Scope) -> None:
    rec.update(outcome=seen.outcome, hog_bytes=seen.hog_bytes, died=seen.deaths)
    if seen.write_error:
        rec["write_error"] = seen.write_error
    if seen.stall:
        rec["stall"] = seen.stall
    rec["exit"] = _exit_signals(roles, [d["role"] for d in seen.deaths])
    rec["probe_victims"] = [
        d["role"] for d in seen.deaths if rec["exit"].get(d["role"]) == "SIGKILL"
    ]
    rec["shmem"]["after_oom"] = shmem()
    rec["shmem"]["swap_after_oom"] = swap_used()
    rec["cgroup"]["current_after_oom"] = scope.current()
    rec["cgroup"]["shmem_after_oom"] = scope.stat("shmem")
    rec["cgroup"]["events"] = scope.events()
    if not scope.owned:  # the container's counters span every repeat: keep this one's
        before = rec["cgroup"].get("events_before") or {}
        rec["cgroup"]["events_total"] = rec["cgroup"]["events"]
        rec["cgroup"]["events"] = events_delta(before, rec["cgroup"]["events"])
    if seen.outcome == "timeout":
        rec["status"] = "timeout"
        rec["error"] = f"the {roles[-1].name} was still running at the per-experiment timeout"


#: memory.oom_control (v1) fields that are states, not counters.
EVENT_FLAGS = frozenset({"oom_kill_disable", "under_oom"})


def events_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """memory.events / memory.oom_control counters of one repeat (flags as they are now)."""
    return {k: v if k in EVENT_FLAGS else v - before.get(k, 0) for k, v in after.items()}


def held_bytes(rec: Record) -> int:
    """What the repeat put in files: the holder's size, or what the writer wrote."""
    if rec.get("holder_role") == "writer":
        return int(rec.get("hog_bytes") or 0)
    return int(rec["sizes"].get("holder", 0))


def judge(rec: Record) -> None:
    """The booleans of a repeat, each able to come out either way.

    ``shmem.freed_by_oom``: after the OOM, Shmem is no longer up by half of what the files
    held (their last reference died with a victim). ``cgroup.charge_stayed``: the memory
    cgroup still carries at least half of it in memory.stat shmem after the OOM (the file
    outlived the victims, or nobody holding it was killed). No harness reference keeps
    a file alive: only the roles hold them.
    """
    sh, cg, held = rec["shmem"], rec["cgroup"], held_bytes(rec)
    if held and sh.get("after_oom") is not None:
        # A page in swap is no longer Shmem: count both, or a swapped file looks freed.
        swapped = (sh.get("swap_after_oom") or 0) - (sh.get("swap_baseline") or 0)
        sh["freed_by_oom"] = sh["after_oom"] - sh["baseline"] + max(swapped, 0) < held // 2
    if held and cg.get("shmem_after_oom") is not None:
        cg["charge_stayed"] = cg["shmem_after_oom"] - (cg.get("shmem_baseline") or 0) >= held // 2


def _finish(
    rec: Record, roles: list[Role], scope: oom_scope.Scope, exp: Experiment, env: Env
) -> None:
    """Kill what is left, judge the repeat, restore knobs, clean up."""
    _kill_all(roles)
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
            os.unlink(os.path.join(env.shm_dir, f"kmx-{exp.name}-{os.getpid()}"))
    problem = oom_scope.release(scope)
    if problem:
        cg["cleanup_error"] = problem
    if not scope.owned:
        _check_container_restored(cg, scope)
    sh = rec["shmem"]
    sh["after_cleanup"] = wait_shmem(sh["baseline"])
    sh["restored"] = sh["after_cleanup"] <= sh["baseline"] + SHMEM_TOLERANCE


def _check_container_restored(cg: Record, scope: oom_scope.Scope) -> None:
    """The container's cgroup outlives the repeat: its shmem charge (memory.stat) must be
    back near the baseline -- the holder's memfd released -- before the next one. Host
    meminfo Shmem, checked too, also moves with everything else on the host."""
    baseline = cg.get("shmem_baseline")
    if baseline is None:
        return
    deadline = time.monotonic() + RESTORE_TIMEOUT
    while True:
        value = scope.stat("shmem")
        if value is None or value <= baseline + CGROUP_SHMEM_TOLERANCE:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    cg.update(shmem_after_cleanup=value, current_after_cleanup=scope.current())
    cg["restored"] = value is not None and value <= baseline + CGROUP_SHMEM_TOLERANCE


#: The role whose memory the experiment is about, where it is not called "holder".
_HOLDER_ROLE = {"memfd-grow": "writer", "cross": "receiver"}


def _new_record(exp: Experiment, repeat: int, env: Env) -> Record:
    return {
        "type": "oom", "event": "result", "name": exp.name, "repeat": repeat,
        "status": "ok", "error": None, "scope": exp.scope, "group": exp.group,
        "writer_protected": exp.writer_protected,
        "holder_role": _HOLDER_ROLE.get(exp.holder, "holder"),
        "mem_total": env.mem_total, "sizes": _sizes(exp, env), "knobs": knobs.oom_knobs(),
        "memcg": env.memcg if exp.scope != "global" else None,
        "oom_score_adj": {"harness": _own_adj(), "roles": env.role_adj},
        "shmem": {"baseline": shmem(), "swap_baseline": swap_used()}, "cgroup": {},
        "vmstat_oom_kill": None,
    }  # fmt: skip


def run_repeat(exp: Experiment, repeat: int, env: Env, emit: Emit) -> Record:
    """One repeat of one experiment, end to end; never raises. Swap experiments swap the
    guest's swap disk on first and off again at the end."""
    problem = swap.swapon(env.swap_dev) if exp.swapped else None
    if problem:
        unavailable = _new_record(exp, repeat, env)
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
    rec = _new_record(exp, repeat, env)
    oom_before = vmstat_oom_kill()
    try:
        scope = _make_scope(exp, env, rec["sizes"].get("limit"))
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
        roles = _spawn_all(_role_specs(exp, env, scope, rec["sizes"]), env, deadline)
        rec["t_ready"] = round(time.monotonic() - start, 3)
        if exp.kill_allocating:
            knobs.set_sysctl("vm/oom_kill_allocating_task", 1)
        _armed(rec, roles, scope, emit, env)
        os.write(roles[-1].cmd_w, b"g")
        stall_s = STALL_S if exp.growth else None
        seen = watch(roles, start, deadline, harness=not scope.owned, stall_s=stall_s)
        _predict(rec, seen.snapshot, scope, env)
        _outcome(rec, seen, roles, scope)
    except (ProtocolError, OSError, ValueError) as exc:
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        rec["t_watched"] = round(time.monotonic() - start, 3)
        _finish(rec, roles, scope, exp, env)
    after = vmstat_oom_kill()
    if oom_before is not None and after is not None:
        rec["vmstat_oom_kill"] = after - oom_before
    rec["duration_s"] = round(time.monotonic() - start, 3)
    return rec


def _own_adj() -> int | None:
    return read_int("/proc/self/oom_score_adj")


def protect_harness() -> str | None:
    """oom_score_adj -1000 for the harness (and, inherited, the roles until they reset it).

    Lowering the adjustment needs CAP_SYS_RESOURCE: a container may refuse. Returns why
    the harness is unprotected, or None.
    """
    try:
        write_text("/proc/self/oom_score_adj", str(OOM_SCORE_ADJ_MIN))
    except OSError as exc:
        return f"the harness cannot set its oom_score_adj to -1000 ({exc})"
    return None


def _runner(exp: Experiment) -> Callable[[Experiment, int, Env, Emit], Record]:
    """run_repeat, or oom_cross's for the cross-charge experiment (it imports this module)."""
    if exp.holder == "cross":
        import oom_cross

        return oom_cross.run_repeat
    return run_repeat


def run_plan(plan: list[tuple[str, int]], env: Env, emit: Emit) -> int:
    """Run the (experiment, repeat) units in order, emitting a record per repeat.

    A global OOM could kill an unprotected harness: those experiments are then "not
    available". memcg OOMs only kill inside the cgroup, which the harness is not in --
    except in a container, where it is and the roles' adjustment is raised instead.
    Nothing raised by one repeat stops the others.
    """
    unprotected = protect_harness()
    if unprotected and env.memcg == "container":
        # The harness shares the roles' (the container's) cgroup: raise theirs instead.
        env = dataclasses.replace(env, role_adj=CONTAINER_ROLE_ADJ, harness_protected=False)
    for name, repeat in plan:
        exp = EXPERIMENTS[name]
        if unprotected and exp.scope == "global":
            rec = _new_record(exp, repeat, env)
            rec.update(status="not available", error=unprotected)
        else:
            try:
                rec = _runner(exp)(exp, repeat, env, emit)
            except Exception as exc:
                rec = {"type": "oom", "event": "result", "name": name, "repeat": repeat}
                rec.update(status="error", error=f"probe error: {exc!r}")
        emit(rec)
    return len(plan)
