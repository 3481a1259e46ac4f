"""kmatrix.results.oom on real OOM boots of Debian's 6.12 kernel (probe records + console).

Boot 1 ran the whole plan (27 units, 3 repeats) and ended in the oom-no-killable panic
after 24 finished repeats; boot 2 ran the remaining no-killable repeats and panicked in
the first. The console keeps every OOM report (stack traces and meminfo trimmed).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

from kmatrix import catalog
from kmatrix.report.oom import SETUPS, distribution, oom_section, quiet_margin, stall_window
from kmatrix.results.oom import (
    EXPERIMENTS,
    BootOutput,
    Unit,
    assemble,
    entries_from_probe,
    summarize,
)
from kmatrix.results.schema import ProbeOutput, parse_probe_output

FIXTURES = Path(__file__).parent / "fixtures" / "oom"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "probes"))
import oom_judge  # noqa: E402  (the probe's own judgement, run on the host)


def _boot(index: int, units: list[Unit], end: dict[str, object]) -> BootOutput:
    probe = parse_probe_output(
        (FIXTURES / f"6.12-boot{index}.results.log").read_text().splitlines()
    )
    console = (FIXTURES / f"6.12-boot{index}.console.log").read_text()
    return BootOutput(index, units, probe, console, end)


#: The experiments those boots ran (the probe's list before the memfd-growth ones).
RECORDED = [
    "oom-global-memfd-unmapped", "oom-global-memfd-mapped", "oom-global-tmpfile-shm",
    "oom-global-shm-named", "oom-global-fd-passed", "oom-memcg-v2", "oom-memcg-v2-group",
    "oom-memcg-v1", "oom-no-killable",
]  # fmt: skip
assert set(RECORDED) <= set(EXPERIMENTS)
UNITS = [Unit(n, r) for n in RECORDED for r in range(3)]
PANIC_END = {"panic": "System is deadlocked on memory", "timed_out": False, "console_tail": ["x"]}
BOOT1 = _boot(1, UNITS, PANIC_END)
LEFT = [Unit("oom-no-killable", 1), Unit("oom-no-killable", 2)]
BOOT2 = _boot(2, LEFT, PANIC_END)


def _entries(boots: list[BootOutput]) -> dict[str, dict[str, object]]:
    return {e["name"]: e for e in assemble(UNITS, boots)}


def test_boot_one_covers_all_but_the_panic_repeats() -> None:
    covered = BOOT1.covered()
    assert Unit("oom-no-killable", 0) in covered
    assert [u for u in UNITS if u not in covered] == LEFT
    assert BOOT1.summary()["finished"] == 24


def test_kernel_victims_by_role() -> None:
    got = _entries([BOOT1, BOOT2])
    assert got["oom-global-memfd-unmapped"]["victims"] == [["hog"]] * 3
    assert got["oom-global-memfd-mapped"]["victims"] == [["holder", "hog"]] * 3
    assert got["oom-global-memfd-mapped"]["predicted_victim"] == ["holder"] * 3
    group = got["oom-memcg-v2-group"]
    assert group["victims"] == [["hog", "holder", "bystander"]] * 3  # kernel order
    assert group["constraint"] == "CONSTRAINT_MEMCG"
    # oom.group kills the chosen victim, then every task of the group, the victim again:
    # 4 "Killed process" lines and memory.events oom_kill 4 for 3 processes.
    assert group["memory_events_oom_kill"] == [4, 4, 4]
    assert [k["role"] for k in group["kills"] if k["repeat"] == 0].count("hog") == 2
    kills = got["oom-global-memfd-mapped"]["kills"]
    holder = next(k for k in kills if k["role"] == "holder")
    assert holder["shmem_rss"] > 20 << 20 and holder["repeat"] == 0


def test_shmem_facts_pass_through() -> None:
    """(These boots predate the judge below; their memcg charge_stayed was recorded while
    the harness still held the memfd, so it is not asserted here.)"""
    got = _entries([BOOT1, BOOT2])
    assert got["oom-global-memfd-unmapped"]["shmem_freed"] == [False] * 3
    assert got["oom-global-memfd-mapped"]["shmem_freed"] == [True] * 3
    assert got["oom-global-shm-named"]["holder_survived"] == [True] * 3
    for run in got["oom-memcg-v2"]["runs"]:
        assert run["shmem_restored"] is True


def test_v1_is_not_available_on_6_12_with_the_reason() -> None:
    v1 = _entries([BOOT1, BOOT2])["oom-memcg-v1"]
    assert v1["status"] == "not available" and v1["repeats"] == 0
    assert "v1 memory controller" in v1["reason"]


def test_panics_are_outcomes_of_their_repeats() -> None:
    nk = _entries([BOOT1, BOOT2])["oom-no-killable"]
    runs = nk["runs"]
    assert [r["status"] for r in runs] == ["panic", "panic", "not run"]
    assert runs[0]["boot"] == 1 and runs[1]["boot"] == 2
    assert runs[0]["no_killable"] and runs[0]["console_tail"] == ["x"]
    assert nk["status"] == "error" and "repeat 2: not run" in nk["reason"]
    assert nk["panic"] is True and nk["victims"] == [[], []]


def test_a_hung_boot_costs_only_the_running_repeat() -> None:
    hung = {"panic": None, "timed_out": True, "console_tail": ["last words"]}
    boot = _boot(2, LEFT, hung)
    boot.console = ""  # nothing on the console: no panic to find
    nk = _entries([BOOT1, boot])["oom-no-killable"]
    assert nk["runs"][1]["status"] == "crashed"
    assert "hung" in nk["runs"][1]["error"]
    assert _entries([BOOT1, boot])["oom-global-memfd-unmapped"]["status"] == "ok"


def test_entries_from_probe_without_a_console() -> None:
    probe = parse_probe_output((FIXTURES / "6.12-boot1.results.log").read_text().splitlines())
    got = {e["name"]: e for e in entries_from_probe(probe)}
    assert got["oom-global-memfd-mapped"]["victims"] == [["holder", "hog"]] * 3
    assert got["oom-global-memfd-mapped"]["runs"][0]["victims_source"] == "probe"
    assert "oom-no-killable" not in got  # started, never finished: no result record


def test_report_section_shows_distributions_and_panics() -> None:
    cell = {"id": "6.12", "oom": assemble(UNITS, [BOOT1, BOOT2])}
    text = oom_section([cell])
    assert "## OOM experiments" in text
    assert "holder → hog 3/3" in text
    assert "not available" in text
    assert "yes (expected)" in text
    assert distribution(["hog", "holder", "hog"]) == "hog 2/3, holder 1/3"


def test_the_stall_note_says_the_window_the_repeats_recorded() -> None:
    cell = {"id": "6.12", "oom": assemble(UNITS, [BOOT1, BOOT2])}
    assert "these results do not record how long (`stall_after_s`)" in oom_section([cell])
    cell["oom"][0]["runs"][0]["stall_after_s"] = 1.5
    assert stall_window([cell]) == "1.5 s (the repeat's `stall_after_s`)"
    assert "no progress for 1.5 s (the repeat's" in oom_section([cell])
    # None recorded: nothing said, and no placeholder left.
    assert "the time the harness missed), `panic`" in oom_section([cell])
    assert "{" not in oom_section([cell])
    cell["oom"][0]["runs"][0]["longest_quiet_s"] = 0.4213
    assert quiet_margin([cell]) == (
        "; a writer that went on was never quiet longer than 0.43 s, also counting only time "
        "in which the harness ran (`longest_quiet_s`)"
    )
    assert "the time the harness missed; a writer that went on was never quiet" in oom_section(
        [cell]
    )


def test_report_section_renders_like_the_rest_of_the_report() -> None:
    """The shared view helpers: ties by name, MiB and seconds with one decimal, cell labels."""
    assert distribution(["holder", "hog"]) == "hog 1/2, holder 1/2"  # a tie: by name
    assert distribution([]) == "—"
    qemu = {
        "id": "5.10",
        "oom": assemble(UNITS, [BOOT1, BOOT2]),
        "oom_memory_bytes": 192 * 1024 * 1024,
        "oom_boots": [{"finished": 3, "duration_s": 44}],
    }
    docker = {
        "id": "host",
        "backend": "docker",
        "oom": [{"name": "oom-memcg-v1", "status": "refused"}],
    }
    text = oom_section([qemu, docker])
    cells = "| 5.10   |       192.0 |              1 |          0 |"
    assert cells + "                  3 |          44.0 |" in text
    assert re.search(r"^\| experiment +\| 5\.10 +\| host \(container\) +\|$", text, re.M)


def test_every_experiment_has_its_setup_line_in_catalog_order() -> None:
    """SETUPS follows the one catalog, and docs/architecture.md's table says the same."""
    assert tuple(SETUPS) == catalog.EXPERIMENTS
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    section = doc.split("\n## OOM experiments\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.*) \|$", section, re.M)
    assert rows == list(SETUPS.items())


# ---- the booleans can come out either way ----------------------------------------------

JUDGED = json.loads((FIXTURES / "judge-6.12.json").read_text())["runs"]


def _rejudge(run: dict[str, Any]) -> dict[str, Any]:
    """The probe's judgement again, from the raw readings alone."""
    rec = copy.deepcopy(run)
    rec["shmem"].pop("freed_by_oom", None)
    rec["cgroup"].pop("charge_stayed", None)
    oom_judge.judge(rec)
    return rec


def test_judgement_from_the_readings_reproduces_what_was_recorded() -> None:
    for name, runs in JUDGED.items():
        for run in runs:
            rec = _rejudge(run)
            assert rec["shmem"].get("freed_by_oom") == run["shmem"].get("freed_by_oom"), name
            assert rec["cgroup"].get("charge_stayed") == run["cgroup"].get("charge_stayed"), name


def test_each_boolean_comes_out_both_ways_on_real_runs() -> None:
    """No harness reference keeps a file alive, so what the kernel did decides each one:
    a surviving holder keeps Shmem up (unmapped, swapped: its pages in swap count too),
    a killed holder or writer gives it back; a memcg whose holder survives keeps the
    charge, a group kill does not."""
    freed = {n: [_rejudge(r)["shmem"]["freed_by_oom"] for r in runs] for n, runs in JUDGED.items()}
    assert freed["oom-global-memfd-unmapped"] == [False] * 3
    assert freed["oom-global-memfd-swapped"] == [False] * 3  # in swap, not freed
    assert freed["oom-global-memfd-mapped"] == [True] * 3
    assert freed["oom-global-memfd-growth"] == [True] * 3
    assert freed["oom-memcg-v2-group"] == [True] * 3
    stayed = {
        n: [_rejudge(r)["cgroup"].get("charge_stayed") for r in runs] for n, runs in JUDGED.items()
    }
    assert stayed["oom-memcg-v2"] == [True] * 3
    assert stayed["oom-memcg-cross-charge"] == [True] * 3
    assert stayed["oom-memcg-v2-group"] == [False] * 3
    assert stayed["oom-global-memfd-unmapped"] == [None] * 3  # no cgroup: not asked
    survived = {n: summarize(n, runs)["holder_survived"] for n, runs in JUDGED.items()}
    assert survived["oom-global-memfd-unmapped"] == [True] * 3
    assert survived["oom-global-memfd-mapped"] == [False] * 3
    assert survived["oom-global-memfd-growth"] == [False] * 3  # the writer, at the end
    assert survived["oom-memcg-v2-memfd-growth-protected"] == [True] * 3


def test_a_swapped_file_is_not_taken_for_freed() -> None:
    """Swapped-out shmem leaves meminfo Shmem: judged on Shmem alone it would look freed."""
    run = JUDGED["oom-global-memfd-swapped"][0]
    assert (
        run["shmem"]["swap_after_oom"] - run["shmem"]["swap_baseline"] > run["sizes"]["holder"] // 2
    )
    blind = copy.deepcopy(run)
    blind["shmem"]["swap_after_oom"] = blind["shmem"]["swap_baseline"]
    assert _rejudge(blind)["shmem"]["freed_by_oom"] is True
    assert _rejudge(run)["shmem"]["freed_by_oom"] is False


def test_a_boot_that_panics_before_the_probe_is_booted_again() -> None:
    """Real console: Debian 7.3-rc under TCG with 2 vCPUs, an int3 Oops in sched_clock_cpu
    during early boot ("Fatal exception in interrupt"). Nothing was measured, so the OOM
    boots (and the accounting boot) boot again instead of giving up on the cell."""
    from kmatrix.cells.console import analyze_console
    from kmatrix.cells.oom_boots import crashed_early

    text = (FIXTURES.parent / "guest" / "7.3-rc-early-oops.console.log").read_text()
    summary = analyze_console(text)
    assert summary.panic == "Fatal exception in interrupt" and not summary.reached_init
    assert crashed_early(None, summary.panic)
    assert not crashed_early({"type": "hello"}, summary.panic)  # the probe ran: a result
    assert not crashed_early(None, None)  # no panic (a hang): not retried


def _dropped_boot(probe_victims: list[str]) -> BootOutput:
    """A real 7.3-rc console (oom.memory 160M, oom-memcg-v2-memfd-growth-protected repeat 2)
    whose printk dropped the Killed lines of two of the three bystanders, with that repeat's
    probe records (pids as recorded in its results.json)."""
    unit = Unit("oom-memcg-v2-memfd-growth-protected", 2)
    pids = {"bystander-1": 175, "bystander-2": 176, "bystander-3": 177, "writer": 178}
    start = {"type": "oom", "event": "start", "name": unit.name, "repeat": 2, "pids": pids}
    result = start | {"event": "result", "status": "ok", "outcome": "writer-stalled",
                      "probe_victims": probe_victims}  # fmt: skip
    console = (FIXTURES / "7.3-rc-killed-lines-dropped.console.log").read_text()
    return BootOutput(2, [unit], ProbeOutput(hello={}, oom=[start, result]), console, {})


def test_kills_the_console_dropped_are_named_not_merged() -> None:
    """The console has only bystander-3's Killed line ("** N printk messages dropped **"
    around it); the probe saw all three die by SIGKILL: the two without a line are named,
    and the victims stay what the kernel printed, in its order."""
    from kmatrix.report.oom import experiment_table

    unit = Unit("oom-memcg-v2-memfd-growth-protected", 2)
    (exp,) = assemble([unit], [_dropped_boot(["bystander-3", "bystander-2", "bystander-1"])])
    (run,) = exp["runs"]
    assert [k["role"] for k in run["kills"]] == ["bystander-3"]
    assert run["victims"] == ["bystander-3"] and run["victims_source"] == "kernel"
    assert run["kills_lost_from_console"] == ["bystander-2", "bystander-1"]
    cell = {"id": "7.3-rc", "backend": "qemu", "oom": [exp]}
    table = experiment_table([cell], unit.name)
    row = next(line for line in table.splitlines() if "kills the console lost" in line)
    assert row.split("|")[2].strip() == "2 in 1 repeat(s) (bystander-2, bystander-1)"
    # When the probe saw no more deaths than the console shows, nothing is named.
    (exp,) = assemble([unit], [_dropped_boot(["bystander-3"])])
    (run,) = exp["runs"]
    assert run["victims"] == ["bystander-3"] and "kills_lost_from_console" not in run
    assert "kills the console lost" not in experiment_table([cell | {"oom": [exp]}], unit.name)
