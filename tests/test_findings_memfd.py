"""Findings about the memfd as the pressure, rendered from a real run (5.10 and 6.12 cells of
the default matrix; probe `before`/`after`, kernel kill lines and /proc snapshots trimmed)."""

from __future__ import annotations

import json
from pathlib import Path

from kmatrix.report.findings import answer_all

RESULTS = json.loads(
    (Path(__file__).parent / "fixtures" / "results" / "memfd-pressure-5.10-6.12.json").read_text()
)
ROWS = {r.question: r for r in answer_all(RESULTS["cells"])}


def _texts(question: str) -> list[str]:
    return [a.text for a in ROWS[question].answers]


def test_serial_kills_list_the_victims_in_order_and_the_ending() -> None:
    texts = _texts("growing unmapped memfd fills RAM: kills in order, ending")
    order = "bystander-3 → bystander-2 → bystander-1 → writer 3/3"
    assert texts == [f"{order}; ended: writer-died 3/3; memfd freed 3/3"] * 2
    protected = _texts("growing memfd, writer at oom_score_adj -1000: kills, ending")
    assert all(t.endswith("ended: panic 3/3") for t in protected)


def test_beyond_half_of_ram_answers_with_the_evidence() -> None:
    assert all(
        t == "no: wrote all 65% of RAM asked for (f_blocks 0 = no size limit)"
        for t in _texts("memfd capped at half of RAM?")
    )
    strict = _texts("memfd capped under vm.overcommit_memory=2?")
    assert all(t.startswith("yes: ENOSPC at 36% of RAM (CommitLimit ") for t in strict)


def test_hugetlb_rows_only_where_pages_were_reserved() -> None:
    assert _texts("MFD_HUGETLB memfd usable (huge pages reserved)?") == ["yes (nr_hugepages=2)"] * 2
    seal = _texts("MFD_HUGETLB + MFD_NOEXEC_SEAL: chmod +x refused?")
    assert seal[0] == "— (memfd_create: EINVAL)"  # 5.10 has no MFD_NOEXEC_SEAL
    assert seal[1].startswith("no: fchmod 755 ok (F_SEAL_EXEC set")
    assert ROWS["MFD_HUGETLB + MFD_NOEXEC_SEAL: chmod +x refused?"].disagree


def test_cross_charge_and_swapped_memfd() -> None:
    cross = _texts("memfd charge stays with the creator's cgroup after it exits?")
    assert all(
        t.startswith("yes 3/3 (A shmem ") and t.endswith("A's OOM killed hog 3/3") for t in cross
    )
    swapped = _texts("mapped memfd in swap counted in VmSwap / oom_score?")
    assert all(t.startswith("no: smaps Swap 6") for t in swapped)


def test_a_stall_without_a_kernel_report_is_said_so() -> None:
    """The stall window is the harness's: a writer-stalled repeat whose kernel printed no
    "no killable" report gets a note; with reports only their median shows; results that
    do not record the count (this fixture's) show neither."""
    question = "growing memfd in a memory cgroup, writer protected: kills, ending"
    assert all("'no killable'" not in t for t in _texts(question))
    cells = json.loads(json.dumps(RESULTS["cells"]))
    exp = next(e for e in cells[0]["oom"] if e["name"] == "oom-memcg-v2-memfd-growth-protected")
    for run, reports in zip(exp["runs"], (293, 0, 301), strict=True):
        run["no_killable_reports"] = reports
    (row,) = [r for r in answer_all(cells) if r.question == question]
    text = row.answers[0].text
    assert text.endswith(
        "ended: writer-stalled 3/3 (median 293 'no killable' reports a repeat)"
        " (1 stalled with none on the console)"
    ), text
    exp["runs"][1]["no_killable_reports"] = 250
    (row,) = [r for r in answer_all(cells) if r.question == question]
    assert row.answers[0].text.endswith("(median 293 'no killable' reports a repeat)")
    for run in exp["runs"]:
        run["no_killable_reports"] = 0
    (row,) = [r for r in answer_all(cells) if r.question == question]
    assert row.answers[0].text.endswith(
        "writer-stalled 3/3 (3 stalled with no 'no killable' report on the console)"
    )
