"""What the outcome of an OOM repeat says: the badness model's prediction, who died and how,
what the OOM freed or left charged, and whether the system is back at its baseline.

Each verdict can come out either way; none is assumed. The booleans are
``shmem.freed_by_oom``, ``cgroup.charge_stayed``, ``shmem.restored`` and (in a container)
``cgroup.restored``.
"""

from __future__ import annotations

import time

import oom_model
import oom_scope
from oom import Env, Record
from oom_harness import Role, exit_signals
from oom_watch import Watch, shmem, swap_used

SHMEM_TOLERANCE = 4 << 20
RESTORE_TIMEOUT = 3.0
#: The container's memory.stat shmem must come back this close to its baseline.
CGROUP_SHMEM_TOLERANCE = 4 << 20
#: memory.oom_control (v1) fields that are states, not counters.
EVENT_FLAGS = frozenset({"oom_kill_disable", "under_oom"})


def predict(
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


def outcome(rec: Record, seen: Watch, roles: list[Role], scope: oom_scope.Scope) -> None:
    rec.update(outcome=seen.outcome, hog_bytes=seen.hog_bytes, died=seen.deaths)
    if seen.write_error:
        rec["write_error"] = seen.write_error
    if seen.stall:
        rec["stall"] = seen.stall
    if rec.get("stall_after_s") is not None:  # the growth experiments: the window's margin
        quiet = seen.longest_quiet_s
        rec["longest_quiet_s"] = round(quiet, 3) if quiet is not None else None
    rec["exit"] = exit_signals(roles, [d["role"] for d in seen.deaths])
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


def wait_shmem(baseline: int, timeout: float = RESTORE_TIMEOUT) -> int:
    """Poll meminfo Shmem until it is back within tolerance of ``baseline``; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = shmem()
        if value <= baseline + SHMEM_TOLERANCE or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def shmem_restored(rec: Record) -> None:
    """After the clean-up: wait for meminfo Shmem to come back; ``restored`` if it did."""
    sh = rec["shmem"]
    sh["after_cleanup"] = wait_shmem(sh["baseline"])
    sh["restored"] = sh["after_cleanup"] <= sh["baseline"] + SHMEM_TOLERANCE


def check_container_restored(cg: Record, scope: oom_scope.Scope) -> None:
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
