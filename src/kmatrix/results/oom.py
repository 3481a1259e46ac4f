"""Turn OOM boots (probe records + console logs) into the results.json ``oom`` entries.

Pure: no process is run here. The probe tells which pid played which role in each
(experiment, repeat) unit; the kernel's console tells whom it killed, in order. Pids are
unique within one boot, so each boot's console is matched with that boot's records only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

from typing_extensions import TypedDict

from kmatrix import catalog
from kmatrix.results.contract_oom import (
    ExperimentKill,
    OomBoot,
    OomCgroup,
    OomExperiment,
    OomKill,
    OomRepeat,
    OomStatus,
    ShmemAccount,
)
from kmatrix.results.oomlog import OomEvent, OomLog, parse_oom_log
from kmatrix.results.schema import JSON, ProbeOutput

#: Canonical experiment names, in report order, and those expected to panic (one catalog).
EXPERIMENTS = catalog.EXPERIMENTS
EXPECTED_PANIC = catalog.EXPECTED_PANIC


@dataclass(frozen=True)
class Unit:
    """One repeat of one experiment."""

    name: str
    repeat: int


class BootEnd(TypedDict, total=False):
    """How one OOM boot ended (``cells.oom_boots``); ``{}`` when there was no boot (a
    container). Not part of the results but through ``OomBoot``."""

    duration_s: float
    timed_out: bool
    returncode: int | None
    panic: str | None
    console_tail: list[str]


@dataclass
class BootOutput:
    """What one OOM boot returned: its plan, the probe's records, its console, how it ended."""

    index: int
    units: list[Unit]
    probe: ProbeOutput
    console: str
    end: BootEnd
    restored: bool = False  # started from the cell's saved boot, not booted (cells.oom_boots)

    def records(self, event: str) -> dict[Unit, JSON]:
        """The probe's ``oom`` records of one kind (``start`` / ``result``) by unit."""
        return {
            Unit(r["name"], int(r["repeat"])): r
            for r in self.probe.oom
            if r.get("event") == event and isinstance(r.get("name"), str)
        }

    def covered(self) -> set[Unit]:
        """Units this boot finished or at least started (a started one is not rerun)."""
        return set(self.records("start")) | set(self.records("result"))

    def summary(self) -> OomBoot:
        """The boot as recorded in the cell (``oom_boots``)."""
        hello = self.probe.hello or {}
        out: OomBoot = {
            "index": self.index,
            "units": len(self.units),
            "finished": len(self.records("result")),
            "mem_total": hello.get("mem_total"),
            "release": hello.get("release"),
            "probe_uptime_s": hello.get("uptime"),  # when the probe started, since boot
            "restored": self.restored,
        }
        # How it ended, but for the console tail (the console log has it all).
        end = self.end
        if "duration_s" in end:
            out["duration_s"] = end["duration_s"]
        if "timed_out" in end:
            out["timed_out"] = end["timed_out"]
        if "returncode" in end:
            out["returncode"] = end["returncode"]
        if "panic" in end:
            out["panic"] = end["panic"]
        return out


def _pids(record: JSON) -> dict[int, str]:
    pids = record.get("pids") or {}
    return {int(pid): role for role, pid in pids.items() if isinstance(pid, int)}


def kills_for(
    log: OomLog, roles: dict[int, str], harness_pid: int | None = None
) -> tuple[list[OomKill], list[OomEvent]]:
    """Kernel kills of the events that involve these pids, with the role of each victim and
    of the task whose allocation invoked the OOM (``harness`` for the probe itself)."""
    events = [e for e in log.events if e.pids() & roles.keys()]
    named = roles | ({harness_pid: "harness"} if harness_pid is not None else {})
    # OomKill is oomlog.Kill's fields plus role and trigger (tests/test_contract.py checks).
    kills = [
        cast(
            OomKill, asdict(k) | {"role": roles.get(k.pid, "other"), "trigger": _trigger(e, named)}
        )
        for e in events
        for k in e.kills
    ]
    return kills, events


def _trigger(event: OomEvent, named: dict[int, str]) -> str | None:
    if event.trigger_pid is None:  # no header (rate limited): the kernel did not say
        return None
    return named.get(event.trigger_pid, "other")


def _constraint(events: list[OomEvent]) -> str | None:
    found = [e.constraint.get("constraint") for e in events if e.constraint.get("constraint")]
    return found[0] if found else None


def _ordered_roles(kills: list[OomKill]) -> list[str]:
    return list(dict.fromkeys(str(k["role"]) for k in kills))


def _from_probe(entry: OomRepeat, result: JSON) -> None:
    """Add the guest-side facts of one finished repeat to its entry."""
    shmem: ShmemAccount = result.get("shmem") or {}
    cgroup: OomCgroup = result.get("cgroup") or {}
    g = result.get
    entry |= {
        "pids": g("pids"), "sizes": g("sizes"), "mem_total": g("mem_total"),
        "pre_oom": g("pre_oom"), "model_points": g("model_points"),
        "predicted_by_oom_score": g("predicted_by_oom_score"),
        "died": g("died"), "exit": g("exit"), "probe_victims": g("probe_victims"),
        "hog_bytes": g("hog_bytes"), "outcome": g("outcome"), "duration_s": g("duration_s"),
        "t_ready": g("t_ready"), "t_watched": g("t_watched"), "memcg": g("memcg"),
        "oom_score_adj": g("oom_score_adj"), "knobs": g("knobs"),
        "knobs_during": g("knobs_during"), "writer_protected": g("writer_protected"),
        "write_error": g("write_error"), "stall": g("stall"),
        "stall_after_s": g("stall_after_s"), "longest_quiet_s": g("longest_quiet_s"),
        "cross": g("cross"),
        "holder_role": g("holder_role"),
        "predicted_victim": g("predicted_victim"),
        "shmem_freed": shmem.get("freed_by_oom"),
        "shmem_restored": shmem.get("restored"),
        "shmem": shmem,
        "cgroup": cgroup,
        "memory_events_oom_kill": (cgroup.get("events") or {}).get("oom_kill"),
        "vmstat_oom_kill": g("vmstat_oom_kill"),
    }  # fmt: skip


def unit_outcome(unit: Unit, boot: BootOutput, log: OomLog) -> OomRepeat:
    """One repeat: the probe's record (if it finished) merged with the kernel's account."""
    result = boot.records("result").get(unit)
    start = boot.records("start").get(unit)
    entry: OomRepeat = {"repeat": unit.repeat, "boot": boot.index, "panic": False,
                        "status": "not run"}  # fmt: skip
    if result is None and start is None:
        return entry | {"error": _no_start_reason(boot), "victims": []}
    record = result or start or {}
    roles = _pids(record)
    entry["start_uptime_s"] = (start or {}).get("uptime")
    harness = record.get("harness_pid")
    kills, events = kills_for(log, roles, harness if isinstance(harness, int) else None)
    victims = _ordered_roles(kills)
    entry |= {"kills": kills, "constraint": _constraint(events)}
    entry["no_killable"] = any(e.no_killable for e in events)
    # A protected task faulting in a full memcg re-enters the OOM killer again and again.
    entry["no_killable_reports"] = sum(e.no_killable for e in events)
    if result is not None:
        _from_probe(entry, result)
        # The probe's result records always carry a status (probes/README.md).
        entry |= {"status": cast(str, result.get("status")), "error": result.get("error")}
        seen = [r for r in result.get("probe_victims") or [] if isinstance(r, str)]
        if not victims and seen:
            victims, entry["victims_source"] = seen, "probe"
        elif lost := [r for r in seen if r not in victims]:
            # The probe saw them die by SIGKILL, the console has no Killed line for them
            # (7.3 drops console messages under an OOM report flood: "** N printk messages
            # dropped **"). Named, not merged into the victims: when they died relative to
            # the kernel's kills is not known (the harness sees deaths in its own order).
            entry["kills_lost_from_console"] = lost
    else:  # started, never finished: the boot ended under it
        _crashed(entry, boot, log, roles)
        entry["holder_role"] = (start or {}).get("holder_role")
    entry |= {"victims": victims, "first_victim": victims[0] if victims else None}
    entry.setdefault("victims_source", "kernel")
    return entry


def _crashed(entry: OomRepeat, boot: BootOutput, log: OomLog, roles: dict[int, str]) -> None:
    """Record that the boot died under a repeat that had started."""
    panic = log.panic is not None
    why = (
        f"kernel panic: {log.panic}"
        if panic
        else ("the guest hung (boot timeout)" if boot.end.get("timed_out") else "the guest died")
    )
    entry |= {
        "status": "panic" if panic else "crashed",
        "panic": panic,
        "panic_message": log.panic,
        "error": None if panic else why,
        "pids": {role: pid for pid, role in roles.items()},
        "console_tail": boot.end.get("console_tail", []),
    }


def _no_start_reason(boot: BootOutput) -> str:
    if boot.probe.hello is None:
        return f"OOM boot {boot.index} never reached the probe ({_end_text(boot.end)})"
    return f"OOM boot {boot.index} ended before this repeat ({_end_text(boot.end)})"


def _end_text(end: BootEnd) -> str:
    if end.get("panic"):
        return f"kernel panic: {end['panic']}"
    if end.get("timed_out"):
        return "timeout"
    return f"QEMU exit {end.get('returncode')}"


def ending(run: OomRepeat) -> str:
    """How one repeat ended: panic, writer-died, write-error ENOMEM, writer-stalled, ..."""
    if run.get("panic"):
        return "panic"
    outcome = str(run.get("outcome") or run.get("status") or "unknown")
    write_error = run.get("write_error")
    return f"{outcome} {write_error}" if write_error else outcome


def _survived(run: OomRepeat) -> bool | None:
    """Did the role holding the memory outlive the OOM? (the writer, in growth experiments)"""
    holder = str(run.get("holder_role") or "holder")
    if run.get("panic") or run.get("status") != "ok":
        return None  # the machine died under it, or the repeat did not finish: neither
    return holder not in run.get("victims", [])


def summarize(name: str, runs: list[OomRepeat]) -> OomExperiment:
    """The results.json entry of one experiment from its repeats."""
    ran = [r for r in runs if r.get("status") in ("ok", "panic")]
    unavailable = [r for r in runs if r.get("status") == "not available"]
    status: OomStatus = "ok"
    reason: str | None = None
    if unavailable and len(unavailable) == len(runs):
        status, reason = "not available", unavailable[0].get("error")
    elif len(ran) < len(runs):
        bad = next(r for r in runs if r not in ran)
        status, reason = "error", f"repeat {bad['repeat']}: {bad.get('status')}: {bad.get('error')}"
    constraints = Counter(r.get("constraint") for r in ran if r.get("constraint"))
    return {
        "name": name,
        "status": status,
        "reason": reason,
        "repeats": len(ran),
        "victims": [r.get("victims", []) for r in ran],
        "first_victim": [r.get("first_victim") for r in ran],
        "predicted_victim": [r.get("predicted_victim") for r in ran],
        "panic": any(r.get("panic") for r in ran),
        "panic_expected": name in EXPECTED_PANIC,
        "holder_survived": [_survived(r) for r in ran],
        "shmem_freed": [r.get("shmem_freed") for r in ran],
        "charge_stayed": [(r.get("cgroup") or {}).get("charge_stayed") for r in ran],
        "ended": [ending(r) for r in ran],
        "memory_events_oom_kill": [r.get("memory_events_oom_kill") for r in ran],
        "constraint": constraints.most_common(1)[0][0] if constraints else None,
        "kills": [_with_repeat(k, r["repeat"]) for r in ran for k in r.get("kills", [])],
        "runs": runs,
    }


def _with_repeat(kill: OomKill, repeat: int) -> ExperimentKill:
    return {**kill, "repeat": repeat}


def assemble(units: Sequence[Unit], boots: Sequence[BootOutput]) -> list[OomExperiment]:
    """Every experiment's entry, in canonical order, from all OOM boots of a cell."""
    logs = {b.index: parse_oom_log(b.console) for b in boots}
    runs: dict[str, list[OomRepeat]] = {}
    for unit in units:
        # A repeat no boot started is told by the last boot that was to run it (with lanes,
        # another lane's last boot knows nothing about it).
        planned = next((b for b in reversed(boots) if unit in b.units), None)
        boot = next((b for b in boots if unit in b.covered()), planned)
        if boot is None:
            entry: OomRepeat = {"repeat": unit.repeat, "status": "not run", "error": "no OOM boot"}
        else:
            entry = unit_outcome(unit, boot, logs[boot.index])
        runs.setdefault(unit.name, []).append(entry)
    return [summarize(name, runs[name]) for name in EXPERIMENTS if name in runs]


def experiment_names(cells: Sequence[JSON]) -> list[str]:
    """Experiment names present in any cell, canonical ones first."""
    seen = [e["name"] for c in cells for e in c.get("oom", []) if isinstance(e, dict)]
    extra = [n for n in dict.fromkeys(seen) if n not in EXPERIMENTS]
    return [n for n in EXPERIMENTS if n in seen] + extra


#: How victims are known without a console: the harness saw its children die of SIGKILL.
PROBE_VICTIMS = "probe"


def entries_from_probe(probe: ProbeOutput) -> list[OomExperiment]:
    """Experiment entries from one probe run without a kernel console (e.g. a container,
    where the host's kernel log is not ours to read): victims come from the probe.

    Every entry and repeat says so (``victims_source: probe``): the kill order is the
    order in which the harness saw its roles die of SIGKILL, not the kernel's log, and a
    repeat in which nobody died is the probe's observation too.
    """
    units = [
        Unit(str(r["name"]), int(r["repeat"]))
        for r in probe.oom
        if r.get("event") == "result" and isinstance(r.get("name"), str)
    ]
    boot = BootOutput(1, units, probe, "", {})
    entries = assemble(units, [boot]) if units else []
    for entry in entries:
        entry["victims_source"] = PROBE_VICTIMS
        for run in entry.get("runs", []):
            run["victims_source"] = PROBE_VICTIMS
        first = next((r for r in entry.get("runs", []) if r.get("status") == "ok"), None)
        if first is not None:  # where it ran and how the harness stayed out of the way
            entry["memcg"] = first.get("memcg")
            entry["cgroup_version"] = (first.get("cgroup") or {}).get("version")
            entry["oom_score_adj"] = first.get("oom_score_adj")
    return entries
