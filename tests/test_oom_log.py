"""kmatrix.results.oomlog on real console logs recorded from every kernel of the default matrix.

Each fixture is one OOM boot's console (ttyS0) from a real TCG run, trimmed to the OOM
reports of its first experiments and the final panic (oom-no-killable). The probe names
its processes kmx-holder / kmx-bystander / kmx-hog, so the kernel lines say who is who.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kmatrix.results.oom import kills_for
from kmatrix.results.oomlog import (
    NO_KILLABLE,
    condense_floods,
    parse_constraint,
    parse_oom_log,
    parse_task_row,
    strip_prefix,
)

FIXTURES = Path(__file__).parent / "fixtures" / "oom"
LOGS = sorted(FIXTURES.glob("*-oom.console.log"))
#: Kernels whose task dump has the 6.8+ columns rss_anon / rss_file / rss_shmem.
NEW_COLUMNS = ("6.12", "unstable", "7.3-rc")


def _kernel(path: Path) -> str:
    return path.name.removesuffix("-oom.console.log")


def test_every_default_kernel_has_a_fixture() -> None:
    assert {_kernel(p) for p in LOGS} == {"5.10", "6.1", "6.12", "unstable", "7.3-rc"}


@pytest.mark.parametrize("path", LOGS, ids=_kernel)
def test_real_log_global_kill_of_the_hog(path: Path) -> None:
    log = parse_oom_log(path.read_text())
    first = log.events[0]
    # Whoever's allocation failed invokes the killer: usually the hog, but on 7.2 the
    # harness (python3, adj -1000) itself hit it once while reading /proc.
    assert first.header and first.trigger_comm in ("kmx-hog", "python3")
    assert first.trigger_pid is not None
    assert first.constraint["constraint"] in ("CONSTRAINT_NONE", "CONSTRAINT_MEMCG")
    (kill,) = first.kills
    assert kill.comm == "kmx-hog" and str(kill.pid) == first.constraint["pid"]
    assert kill.anon_rss > 4 << 20 and kill.oom_score_adj == 0
    assert kill.pid in first.pids()


@pytest.mark.parametrize("path", LOGS, ids=_kernel)
def test_real_log_task_dump_columns_by_version(path: Path) -> None:
    log = parse_oom_log(path.read_text())
    # A global OOM dumps every task (a memcg OOM only the cgroup's, without the harness).
    event = next(e for e in log.events if e.constraint.get("constraint") == "CONSTRAINT_NONE")
    names = {row["name"] for row in event.tasks}
    assert {"kmx-holder", "kmx-bystander", "kmx-hog"} <= names
    harness = next(row for row in event.tasks if row["oom_score_adj"] == -1000)
    assert harness["name"] == "python3"
    if _kernel(path) in NEW_COLUMNS:
        assert event.task_columns[:5] == ["uid", "tgid", "total_vm", "rss", "rss_anon"]
        hog = next(row for row in event.tasks if row["name"] == "kmx-hog")
        assert hog["rss_anon"] > 1000  # pages
    else:
        assert "rss_anon" not in event.task_columns
        assert event.task_columns[-1] == "name"


@pytest.mark.parametrize("path", LOGS, ids=_kernel)
def test_real_log_mapped_memfd_holder_is_killed_with_its_shmem(path: Path) -> None:
    log = parse_oom_log(path.read_text())
    holders = [k for e in log.events for k in e.kills if k.comm == "kmx-holder"]
    assert holders, "the fixture holds oom-global-memfd-mapped"
    assert holders[0].shmem_rss > 20 << 20


@pytest.mark.parametrize("path", LOGS, ids=_kernel)
def test_real_log_ends_in_the_no_killable_panic(path: Path) -> None:
    log = parse_oom_log(path.read_text())
    assert log.events[-1].no_killable
    assert log.events[-1].kills == []
    assert all(row["oom_score_adj"] == -1000 for row in log.events[-1].tasks)
    assert log.panic == "System is deadlocked on memory"


def test_strip_prefix_and_constraint() -> None:
    line = "[   10.395272] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,"
    line += "mems_allowed=0-1,3,oom_memcg=/kmx-a,task_memcg=/kmx-a,task=kmx-hog,pid=89,uid=0\r\n"
    got = parse_constraint(strip_prefix(line))
    assert got["constraint"] == "CONSTRAINT_MEMCG"
    assert got["mems_allowed"] == "0-1,3"
    assert got["oom_memcg"] == "/kmx-a" and got["pid"] == "89"


def test_task_row_needs_the_header_columns() -> None:
    cols = ["uid", "tgid", "total_vm", "rss", "pgtables_bytes", "swapents", "oom_score_adj"]
    cols.append("name")
    row = parse_task_row(cols, "[     89]     0    89  16271  14308   167936        0  0 kmx-hog")
    assert row == {
        "pid": 89, "uid": 0, "tgid": 89, "total_vm": 16271, "rss": 14308,
        "pgtables_bytes": 167936, "swapents": 0, "oom_score_adj": 0, "name": "kmx-hog",
    }  # fmt: skip
    assert parse_task_row(cols, "[     89]     0    89") is None


def test_group_kill_and_rate_limited_lines() -> None:
    text = "\n".join(
        [
            "Memory cgroup out of memory: Killed process 5 (kmx-hog) total-vm:1kB, anon-rss:2kB,"
            " file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0",
            "Tasks in /kmx-g are going to be killed due to memory.oom.group set",
            "Memory cgroup out of memory: Killed process 4 (kmx-holder) total-vm:1kB,"
            " anon-rss:2kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0",
            "oom_reaper: reaped process 4 (kmx-holder), now anon-rss:0kB, file-rss:0kB,"
            " shmem-rss:0kB",
        ]
    )
    log = parse_oom_log(text)
    (event,) = log.events
    assert not event.header and event.group_memcg == "/kmx-g"
    assert [k.pid for k in event.kills] == [5, 4]
    assert event.kills[1].reaped and event.kills[0].memcg
    assert parse_oom_log(text.split("\n")[0] + "\n" + text.split("\n")[0]).events[1].kills


def test_many_kills_in_a_row_survive_the_rate_limited_headers() -> None:
    """A real 6.1 console: three repeats of oom-global-memfd-growth (4 kills each) and the
    first of -kill-allocating in ~5 s. mm/oom_kill.c oom_kill_process() prints
    dump_header() only while __ratelimit(&oom_rs) allows (DEFAULT_RATELIMIT_BURST 10 per
    DEFAULT_RATELIMIT_INTERVAL 5 s), so the 11th kill onwards has a Killed line alone; the
    excerpt starts just after the header of the first kill (pid 179)."""
    text = (FIXTURES / "6.1-growth-ratelimited.console.log").read_text()
    log = parse_oom_log(text)
    pids = [k.pid for e in log.events for k in e.kills]
    assert pids == [179, 183, 182, 181, 184, 187, 186, 185, 188, 191, 190, 189, 192, 196]
    headless = [e.kills[0].pid for e in log.events if not e.header]
    assert headless == [179, 189, 192, 196]
    assert sum(e.header for e in log.events) == text.count("invoked oom-killer") == 10
    last = log.events[-1].kills[0]
    assert last.comm == "kmx-writer" and not last.memcg and last.allocating_task
    assert not any(k.allocating_task for e in log.events[:-1] for k in e.kills)


def test_a_flood_of_kill_less_reports_is_cut_in_the_stored_console_only() -> None:
    """A real 6.12 console of oom-memcg-v2-memfd-growth-protected: the writer (adj -1000)
    re-enters mem_cgroup_out_of_memory() from every page fault of a full cgroup, and each
    entry prints a report ending in "no killable processes". The stored copy keeps the
    first and last reports of a run; kills and their order are untouched."""
    text = (FIXTURES / "6.12-memcg-protected-flood.console.log").read_text()
    short, cut = condense_floods(text)
    assert cut > 0 and len(short) < len(text)
    assert short.count(NO_KILLABLE) + cut == text.count(NO_KILLABLE)
    assert f"[kmatrix: {cut} more OOM reports" in short

    def kills(t: str) -> list[int]:
        return [k.pid for e in parse_oom_log(t).events for k in e.kills]

    assert kills(short) == kills(text) and kills(text)
    assert condense_floods(short) == (short, 0)  # nothing left to cut


def test_a_kill_after_a_no_killable_report_is_an_event_of_its_own() -> None:
    """Real 6.12 arm64 console: the protected writer's last report ("no killable
    processes", trigger pid 277) is followed, a repeat later, by a rate-limited Killed line
    for pid 280 with no header of its own. Attached to the report before it, the kill
    would be counted for both repeats."""
    log = parse_oom_log((FIXTURES / "6.12-arm64-kill-after-no-killable.console.log").read_text())
    first, *rest = log.events
    assert first.no_killable and first.trigger_pid == 277 and not first.kills
    assert [(e.header, [k.pid for k in e.kills]) for e in rest] == [(False, [280]), (False, [279])]
    assert 277 not in rest[0].pids()


def test_a_headless_kill_after_a_group_kill_is_another_oom() -> None:
    """Real 6.12 lines: a memory.oom.group kill (the hog, then the whole group, the hog
    again) and the next experiment's first kill 0.9 s later, its header removed as the
    dump_header() rate limit removes it. The group's Killed lines come in one burst
    (mm/oom_kill.c oom_kill_process: mem_cgroup_scan_tasks(oom_group, ...)), so a Killed
    line long after it belongs to another OOM, not to the group."""
    log = parse_oom_log((FIXTURES / "6.12-group-then-headless-kill.console.log").read_text())
    group, later = log.events
    assert group.group_memcg == "/kmx-oom-memcg-v2-group"
    assert [k.pid for k in group.kills] == [267, 265, 266, 267]
    assert [k.pid for k in later.kills] == [270] and not later.header


def test_a_kill_the_harness_set_off_is_told_apart() -> None:
    """Real 7.2 lines (oom.memory 160M): the hog is killed, and 14 ms later the harness's own
    page fault (python3, oom_score_adj -1000) invokes the OOM killer again before the hog's
    memory is back, which kills the bystander. mm/oom_kill.c dump_header() names the task
    whose allocation invoked it (``%s invoked oom-killer``, then ``PID: %d Comm: %s`` of
    current): the kill's ``trigger`` is that task's role, "harness" for the probe itself."""
    log = parse_oom_log((FIXTURES / "7.2-harness-triggered-kill.console.log").read_text())
    roles = {127: "holder", 128: "bystander", 129: "hog"}
    kills, _ = kills_for(log, roles, harness_pid=120)
    assert [(k["role"], k.get("trigger")) for k in kills] == [
        ("hog", "hog"),
        ("bystander", "harness"),
    ]
    # Without the harness's pid (results of an older probe) the trigger is just not a role.
    kills, _ = kills_for(log, roles)
    assert [k.get("trigger") for k in kills] == ["hog", "other"]


def test_a_kill_without_its_header_has_no_known_trigger() -> None:
    """dump_header() is rate limited (mm/oom_kill.c oom_kill_process, __ratelimit(&oom_rs)):
    a Killed line without its header does not say whose allocation invoked the OOM."""
    log = parse_oom_log((FIXTURES / "6.12-group-then-headless-kill.console.log").read_text())
    kills, _ = kills_for(log, {270: "hog"})
    assert [(k["pid"], k.get("trigger")) for k in kills] == [(270, None)]


def test_the_report_counts_kills_the_harness_set_off_once_each() -> None:
    """The OOM table's row for the kills of the 7.2 fixture: one of two, the bystander; a
    kill listed twice (a memory.oom.group victim has two Killed lines) counts once."""
    from kmatrix.report.oom import _harness_kills

    log = parse_oom_log((FIXTURES / "7.2-harness-triggered-kill.console.log").read_text())
    kills, _ = kills_for(log, {127: "holder", 128: "bystander", 129: "hog"}, harness_pid=120)
    entry = {"kills": [dict(k, repeat=0) for k in [*kills, kills[0]]]}
    assert _harness_kills(entry) == "1 of 2 kills (bystander)"
    assert _harness_kills({"kills": [dict(kills[0], repeat=0)]}) == "—"
