"""kmatrix.oomresults on real OOM boots of Debian's 6.12 kernel (probe records + console).

Boot 1 ran the whole plan (27 units, 3 repeats) and ended in the oom-no-killable panic
after 24 finished repeats; boot 2 ran the remaining no-killable repeats and panicked in
the first. The console keeps every OOM report (stack traces and meminfo trimmed).
"""

from __future__ import annotations

from pathlib import Path

from kmatrix.oomresults import EXPERIMENTS, BootOutput, Unit, assemble, entries_from_probe
from kmatrix.report_oom import distribution, oom_section
from kmatrix.results import parse_probe_output

FIXTURES = Path(__file__).parent / "fixtures" / "oom"


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


def test_shmem_and_charge_facts() -> None:
    got = _entries([BOOT1, BOOT2])
    assert got["oom-global-memfd-unmapped"]["shmem_freed"] == [False] * 3
    assert got["oom-global-memfd-mapped"]["shmem_freed"] == [True] * 3
    assert got["oom-global-shm-named"]["holder_survived"] == [True] * 3
    for run in got["oom-memcg-v2"]["runs"]:
        assert run["cgroup"]["charge_stayed"] is True
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
