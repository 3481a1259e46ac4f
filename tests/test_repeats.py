"""Repeated scenarios: medians and spreads from the probe's records, and diffs without noise.

The two fixture runs are real: `invoke matrix --kernels 6.12,unstable --force` twice on the
same commit (accounting only, OOM experiments dropped from the fixture to keep it small).
Their meminfo_MemAvailable deltas differ by tens of MiB between runs, as on every 6.12+ kernel.
"""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path
from typing import Any

from kmatrix.report.diff import Threshold, render_diff
from kmatrix.results.repeats import aggregate_scenarios, beyond_repeat_noise, repeat_noise
from kmatrix.results.schema import parse_probe_output

RESULTS = Path(__file__).resolve().parent / "fixtures" / "results"
MIB = 1024 * 1024


def record(name: str, repeat: int, avail: int, errno: str | None = None) -> dict[str, Any]:
    return {
        "type": "scenario",
        "name": name,
        "size_bytes": 64 * MIB,
        "metrics": {"meminfo_MemAvailable_delta": avail, "VmRSS_delta": 0},
        "before": {"VmRSS": repeat},
        "after": {},
        "errno": errno,
        "error": None,
        "detail": {"repeat_detail": repeat},
        "duration_s": 1.0 + repeat,
        "repeat": repeat,
    }


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / name).read_text())
    return data


def test_median_spread_and_every_repeat_kept() -> None:
    records = [
        record("memfd-write", 0, -40 * MIB),
        record("anon-private", 0, -60 * MIB),
        record("memfd-write", 1, -20 * MIB, errno="ENOSPC"),
        record("anon-private", 1, -62 * MIB),
        record("memfd-write", 2, -30 * MIB),
        record("anon-private", 2, -61 * MIB),
    ]
    memfd, anon = aggregate_scenarios(records)
    assert memfd["name"] == "memfd-write" and anon["name"] == "anon-private"
    assert memfd["metrics"]["meminfo_MemAvailable_delta"] == -30 * MIB
    assert memfd["spread"]["meminfo_MemAvailable_delta"] == 20 * MIB
    assert anon["metrics"]["meminfo_MemAvailable_delta"] == -61 * MIB
    assert [r["metrics"]["meminfo_MemAvailable_delta"] for r in memfd["repeats"]] == [
        -40 * MIB,
        -20 * MIB,
        -30 * MIB,
    ]
    assert memfd["errno"] is None  # one repeat of three said ENOSPC: the majority did not
    assert memfd["detail"] == {"repeat_detail": 0} and memfd["before"] == {"VmRSS": 0}
    assert [r["duration_s"] for r in memfd["repeats"]] == [1.0, 2.0, 3.0]


def test_the_probes_done_count_covers_every_repeat() -> None:
    def line(rec: dict[str, Any]) -> str:
        payload = json.dumps(rec, separators=(",", ":"))
        return f"KMX1 {payload} {zlib.crc32(payload.encode()):08x}"

    hello = {"type": "hello", "probe_version": 1}
    recs = [record("memfd-write", i, -i * MIB) for i in range(3)]
    lines = [line(hello), *map(line, recs), line({"type": "done", "scenarios": 3})]
    out = parse_probe_output(lines)
    assert out.complete and len(out.scenarios) == 3


def test_the_spreads_decide_what_is_noise() -> None:
    (a,) = aggregate_scenarios([record("x", i, v * MIB) for i, v in enumerate((-40, -20, -30))])
    (b,) = aggregate_scenarios([record("x", i, v * MIB) for i, v in enumerate((-25, -10, -12))])
    (c,) = aggregate_scenarios([record("x", i, v * MIB) for i, v in enumerate((-2, -1, -3))])
    key = "meminfo_MemAvailable_delta"
    assert repeat_noise(a, b, key) == (20 + 15) * MIB
    assert not beyond_repeat_noise(a, b, key)  # medians 18 MiB apart, within the noise
    assert beyond_repeat_noise(a, c, key)  # 28 MiB apart, noise 20 + 2 MiB
    no_repeats = {"metrics": {key: 0}}
    assert repeat_noise(a, no_repeats, key) is None and beyond_repeat_noise(a, no_repeats, key)


def test_two_runs_of_the_same_commit_diff_as_no_changes() -> None:
    first, second = load("repeats-run-a.json"), load("repeats-run-b.json")
    out = render_diff(first, second, Threshold(), "a", "b")
    assert out.startswith("No changes between `a` and `b`"), out
    # Without the repeats only the fixed threshold is left, and MemAvailable's noise shows:
    bare = [copy.deepcopy(first), copy.deepcopy(second)]
    for doc in bare:
        for cell in doc["cells"]:
            for sc in cell["scenarios"]:
                sc.pop("repeats", None)
    noisy = render_diff(*bare, Threshold(), "a", "b")
    assert "meminfo_MemAvailable" in noisy


def test_a_real_change_is_still_listed() -> None:
    first, second = load("repeats-run-a.json"), load("repeats-run-b.json")
    changed = copy.deepcopy(second)
    cell = next(c for c in changed["cells"] if c["id"] == "6.12")
    memfd = next(s for s in cell["scenarios"] if s["name"] == "memfd-write")
    memfd["metrics"]["meminfo_Shmem_delta"] += 8 * MIB
    out = render_diff(first, changed, Threshold(), "a", "b")
    rows = [line for line in out.splitlines() if line.startswith("| 6.12")]
    assert len(rows) == 1 and "memfd-write" in rows[0] and "meminfo_Shmem" in rows[0], out
    assert "+8.0" in rows[0]
