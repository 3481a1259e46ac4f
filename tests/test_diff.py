"""`invoke diff`: only real changes are listed; the noise threshold decides what is real."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from kmatrix.errors import UserError
from kmatrix.report.diff import Threshold, diff_files, parse_threshold, render_diff

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results" / "partial-5.10-6.1.json"
MIB = 1024 * 1024


def base() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


def bump(data: dict[str, Any], cid: str, scenario: str, metric: str, by: int) -> dict[str, Any]:
    out = copy.deepcopy(data)
    c = next(c for c in out["cells"] if c["id"] == cid)
    sc = next(s for s in c["scenarios"] if s["name"] == scenario)
    sc["metrics"][metric] += by
    return out


def diff(a: dict[str, Any], b: dict[str, Any], th: Threshold | None = None) -> str:
    return render_diff(a, b, th or Threshold(), "old.json", "new.json")


def test_same_file_prints_the_no_change_line() -> None:
    out = diff_files(FIXTURE, FIXTURE)
    assert out.count("\n") == 1 and out.startswith("No changes between")


def test_lists_changed_metric_with_cell_and_kernel() -> None:
    out = diff(base(), bump(base(), "6.1", "memfd-write", "VmRSS_delta", 512 * MIB))
    rows = [line for line in out.splitlines() if line.startswith("| 6.1")]
    assert len(rows) == 1
    assert [c.strip() for c in rows[0].strip("|").split("|")] == [
        "6.1",
        "memfd-write",
        "VmRSS",
        "0.3",
        "512.3",
        "+512.0",
    ]


@pytest.mark.parametrize(
    ("scenario", "metric", "by", "listed"),
    [
        ("memfd-write", "VmRSS_delta", MIB // 2, False),  # small base: below 1 MiB
        ("memfd-write", "VmRSS_delta", 2 * MIB, True),  # small base: above 1 MiB
        ("memfd-mmap", "VmRSS_delta", 2 * MIB, False),  # 64 MiB base: 2 MiB is under 5 %
        ("memfd-mmap", "VmRSS_delta", -4 * MIB, True),  # 64 MiB base: 4 MiB is over 5 %
        ("memfd-mmap", "oom_score_delta", 5, False),  # points: 5 is the noise floor
        ("memfd-mmap", "oom_score_delta", 6, True),
    ],
)
def test_noise_threshold(scenario: str, metric: str, by: int, listed: bool) -> None:
    out = diff(base(), bump(base(), "5.10", scenario, metric, by))
    assert out.startswith("No changes") is not listed


def test_custom_threshold() -> None:
    th = parse_threshold("4MiB, 1%, 20pt")
    assert th == Threshold(bytes=4 * MIB, percent=1.0, points=20)
    changed = bump(base(), "5.10", "memfd-write", "VmRSS_delta", 3 * MIB)
    assert diff(base(), changed, th).startswith("No changes")
    assert not diff(base(), changed).startswith("No changes")
    assert parse_threshold("10%") == Threshold(percent=10.0)


@pytest.mark.parametrize("text", ["1MB", "five", "1MiB;5%"])
def test_bad_threshold_is_a_user_error(text: str) -> None:
    with pytest.raises(UserError, match=re.escape("write e.g. '1MiB,5%'")):
        parse_threshold(text)


def test_cells_added_removed_and_status() -> None:
    new = base()
    removed = new["cells"].pop(0)
    new["cells"].append(dict(removed, id="6.12"))
    new["cells"][0] = dict(new["cells"][0], status="timeout", reason="hung", scenarios=[])
    out = diff(base(), new)
    assert "- added cell `6.12`" in out and "- removed cell `5.10`" in out
    assert "- `6.1`: status ok → timeout (hung)" in out


def test_a_change_of_how_tcg_ran_the_vcpus_is_listed() -> None:
    """Results from before tcg_thread was recorded have none: shown as a dash, not "None"."""
    new = base()
    new["cells"][0]["tcg_thread"] = "single"
    assert "- `5.10`: tcg_thread — → single" in diff(base(), new)
    assert "tcg_thread" not in diff(new, new)


def test_a_change_of_how_many_qemus_ran_at_once_is_listed() -> None:
    """A cell measured with more guests competing for the CPU (--jobs) says so in a diff."""
    old, new = base(), base()
    old["cells"][0]["qemu_slots"], new["cells"][0]["qemu_slots"] = 3, 7
    assert "- `5.10`: qemu_slots 3 → 7" in diff(old, new)
    assert "qemu_slots" not in diff(new, new)


def test_kernel_version_and_errno_changes() -> None:
    new = base()
    new["cells"][1]["kernel"]["version"] = "6.1.177-1"
    sc = next(s for s in new["cells"][1]["scenarios"] if s["name"] == "memfd-over-shm-limit")
    sc["errno"] = "ENOSPC"
    out = diff(base(), new)
    assert "`6.1`: kernel version 6.1.176-1 → 6.1.177-1" in out
    assert "| memfd-over-shm-limit | errno" in out and "ENOSPC" in out


def test_oom_victim_distribution_change() -> None:
    old, new = base(), base()
    exp = {"name": "oom-global-memfd-mapped", "victims": [["hog"], ["hog"]], "panic": False}
    old["cells"][0]["oom"] = [exp]
    new["cells"][0]["oom"] = [dict(exp, victims=[["holder"], ["hog"]])]
    out = diff(old, new)
    assert "| oom-global-memfd-mapped | first victim | hog 2/2" in out
    assert "hog 1/2, holder 1/2" in out
    assert diff(old, copy.deepcopy(old)).startswith("No changes")
