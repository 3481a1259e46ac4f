"""Watching an OOM repeat: the driver's progress, /proc snapshots of the roles, every death.

The driver (the last role: the hog, or the memfd writer) reports progress per chunk; the
harness snapshots every role's /proc values after each one, so the last complete snapshot
before the first death is at most a chunk old, and reads meminfo right after each death.
Also the system-wide readings a repeat records (Shmem, swap in use, the oom_kill counter).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
from dataclasses import dataclass, field

import oom_growth
import oom_model
from accounting import ProcFile, meminfo_metrics, parse_flat_keyed, read_meminfo, read_text
from messages import Channel
from oom import Record
from oom_harness import Role

SETTLE_S = 0.15  # after the hog died: time for group kills / reaping to finish
#: While a stall is judged, the harness wakes at least this often, so it can tell how long
#: it did not run itself (below).
STALL_POLL_S = 0.25
#: A wake-up later than asked by more than this: the harness itself did not run. Under TCG
#: the guest's clock runs on while the host leaves its QEMU off the CPU (an oversubscribed
#: host), so a writer that stops reporting then is starved, not stuck in the kernel. With
#: guest.tcg_thread single (the default) the guest's vCPUs share one host thread, so the
#: harness starves with the writer. 0.25 s is above the other vCPU's turn in TCG's
#: round-robin (its kick period is 0.1 s) with 2 vCPUs; with 4 or more, ordinary turns can
#: count as late too, which only lengthens the window a stall is judged over, never
#: shortens it. The harness can also be late inside the guest (its own allocations in a
#: full memory): that, too, only lengthens the window, up to the repeat's timeout.
LATE_S = 0.25


def snapshot_all(
    roles: list[Role], procs: dict[int, oom_model.ProcOf], harness: bool = False
) -> dict[str, dict[str, int]] | None:
    """/proc values of every role (and of the harness when it shares their cgroup, as it
    does in a container: it is then an OOM candidate too); None if one is gone. ``procs``
    holds each process's files, opened once by watch() (oom_model.ProcOf)."""
    snaps = {}
    pids = [(r.name, r.pid) for r in roles if r.name != "creator"]
    for name, pid in pids + ([("harness", os.getpid())] if harness else []):
        # watch() opened every file before the driver started; one it could not open was of
        # a process gone already (no path lookup here, while memory runs out).
        proc = procs.get(pid)
        snap = proc.snapshot() if proc is not None else None
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
    #: The longest the driver went without a message and then sent one (time the harness
    #: ran, as for a stall): how close a writer that went on came to the stall window.
    #: None until a first message came.
    longest_quiet_s: float | None = None
    #: The /proc files read while the driver runs, opened once (accounting.ProcFile).
    procs: dict[int, oom_model.ProcOf] = field(default_factory=dict)
    meminfo: ProcFile | None = None

    def close(self) -> None:
        """Close the /proc files the watch kept open."""
        for proc in self.procs.values():
            proc.close()
        if self.meminfo is not None:
            self.meminfo.close()


def _on_message(message: Record, roles: list[Role], watch: Watch, harness: bool) -> bool:
    """Handle one driver message; True when the driver stopped without being killed."""
    if "progress" in message:
        watch.hog_bytes = int(message["progress"])
        if not watch.deaths:
            watch.snapshot = snapshot_all(roles, watch.procs, harness) or watch.snapshot
    if "write_error" in message:
        watch.write_error = str(message["write_error"])
        watch.outcome = "write-error"
        return True
    if "done" in message:
        watch.outcome = f"{roles[-1].name}-done"
        return True
    return False


def _death(role: Role, start: float, meminfo: ProcFile) -> Record:
    try:
        info = meminfo_metrics(meminfo.read())
    except (OSError, ValueError):
        info = {}
    return {
        "role": role.name,
        "t": round(time.monotonic() - start, 3),
        "shmem": info.get("meminfo_Shmem"),
        "mem_available": info.get("meminfo_MemAvailable"),
    }


def watch(
    roles: list[Role], start: float, deadline: float, harness: bool = False,
    stall_s: float | None = None, go: bool = False,
) -> Watch:  # fmt: skip
    """Follow the driver's progress (snapshotting /proc per chunk) and every role's death.

    The driver is the last role (the hog, or the memfd writer); the repeat ends shortly
    after it dies or stops. ``harness``: include the harness in the snapshots (it shares
    the roles' cgroup). ``go``: tell the driver to start, once the harness is warmed up."""
    # Opened now, while memory is still free: reading them again allocates nothing.
    result = Watch()
    try:
        result.meminfo = ProcFile("/proc/meminfo")
        pids = [r.pid for r in roles if r.name != "creator"] + ([os.getpid()] if harness else [])
        for pid in pids:
            with contextlib.suppress(OSError):  # gone already: its snapshot will say so
                result.procs[pid] = oom_model.ProcOf(pid)
        if go:
            _warm_up(roles, result, harness)
            os.write(roles[-1].cmd_w, b"g")
        return _follow(roles, start, deadline, harness, stall_s, result)
    finally:
        result.close()


def _warm_up(roles: list[Role], result: Watch, harness: bool) -> None:
    """Run what the watch runs on each progress line and death, once, before the driver
    starts. The roles share the harness's pages copy-on-write (they are its forks), so the
    harness's first write to each page after the fork copies it, and Python writes the
    objects it merely uses (reference counts). Those copies are page allocations: made
    while memory runs out, they invoked the OOM killer themselves (a kill the harness set
    off, named by its ``trigger``). Made now, while memory is free, they cost the same and
    decide nothing."""
    scratch = Watch(procs=result.procs)  # the same open files; its findings are dropped
    _on_message(json.loads(b'{"progress": 0}'), roles, scratch, harness)
    if result.meminfo is not None:
        _death(roles[-1], time.monotonic(), result.meminfo)
    r, w = os.pipe()  # a role's progress line arrives in a 64 KiB read (Channel)
    try:
        os.write(w, b"\n")
        Channel(r).read_available()
    finally:
        os.close(r)
        os.close(w)


def _missed(at: float, due: float) -> float:
    """How long the harness did not run between ``due`` (when it was to run again) and
    ``at`` (when it did): 0 within LATE_S."""
    return overdue if (overdue := at - due) > LATE_S else 0.0


def _pending(role: Role) -> bool:
    """Whether ``role`` has written something the harness has not read yet."""
    return bool(select.select([role.channel.fd], [], [], 0)[0])


def _follow(
    roles: list[Role], start: float, deadline: float, harness: bool,
    stall_s: float | None, result: Watch,
) -> Watch:  # fmt: skip
    assert result.meminfo is not None
    meminfo = result.meminfo
    live = {r.channel.fd: r for r in roles if r.name != "creator"}
    driver = roles[-1]
    stop_at, heard = deadline, time.monotonic()
    due = heard  # when the loop was to run again
    late = 0.0  # of the time since the driver was last heard, how long the harness did not run
    while live:
        now = time.monotonic()
        # Asked to run again at ``due`` (a select's timeout, or right after handling what
        # it returned): a pass that starts much later did not run in between.
        late += _missed(now, due)
        if now >= stop_at:
            break
        # Quiet time counts only while the harness ran: a starved guest is not a stall;
        # nor is a writer whose progress line waits in the pipe.
        if stall_s and driver.alive and now - heard - late > stall_s and not _pending(driver):
            result.outcome, result.stall = (
                f"{driver.name}-stalled",
                oom_growth.stall_evidence(driver.pid, now - heard, late),
            )
            break
        wait = stop_at - now
        if stall_s:
            wait = min(wait, heard + late + stall_s - now, STALL_POLL_S)
        wait = max(wait, 0.01)
        ready = select.select(list(live), [], [], wait)[0]
        due = min(time.monotonic(), now + wait)
        for fd in ready:
            role = live[fd]
            messages = role.channel.read_available()
            if role is driver:
                heard_at = time.monotonic()
                if messages is not None:  # went on (not an end of file: it died)
                    # This pass's own lateness too, as the next pass would have counted it.
                    quiet = max(heard_at - heard - late - _missed(heard_at, due), 0.0)
                    result.longest_quiet_s = max(result.longest_quiet_s or 0.0, quiet)
                heard, late = heard_at, 0.0
                due = max(due, heard)
            if messages is None:
                role.alive = False
                del live[fd]
                result.deaths.append(_death(role, start, meminfo))
                if role is driver and result.outcome == "timeout":
                    result.outcome = f"{driver.name}-died"
                    stop_at = time.monotonic() + SETTLE_S
            elif any(_on_message(m, roles, result, harness) for m in messages):
                stop_at = time.monotonic()
    return result
