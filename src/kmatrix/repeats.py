"""Repeated scenario runs: every repeat kept, the median as the value, the spread as its noise.

The probe runs the accounting scenarios in ``probe.repeats`` passes within one boot and sends
one record per scenario and pass. Here they become one results.json scenario each: ``metrics``
holds the median of every metric (what tables, checks and diffs use), ``spread`` the range
(max - min) across the repeats, and ``repeats`` the per-repeat values.
"""

from __future__ import annotations

import statistics
from collections import Counter

from kmatrix.results import JSON, scenario_result


def median_int(values: list[int]) -> int:
    """The median, rounded to whole bytes (an even count averages the middle two)."""
    return round(statistics.median(values))


def _majority(values: list[str | None]) -> str | None:
    """The most common value, the earliest on a tie (e.g. one repeat's errno differing)."""
    return Counter(values).most_common(1)[0][0] if values else None


def aggregate(records: list[JSON]) -> JSON:
    """One scenario from its repeat records (same name), in repeat order.

    ``detail``, ``before`` and ``after`` are the first repeat's: they describe how the
    scenario ran, which the repeats share.
    """
    first = scenario_result(records[0])
    keys = sorted({k for r in records for k in (r.get("metrics") or {})})
    values = {k: [r["metrics"][k] for r in records if k in (r.get("metrics") or {})] for k in keys}
    return first | {
        "metrics": {k: median_int(v) for k, v in values.items()},
        "spread": {k: max(v) - min(v) for k, v in values.items()},
        "errno": _majority([r.get("errno") for r in records]),
        "error": _majority([r.get("error") for r in records]),
        "repeats": [
            {
                "metrics": r.get("metrics") or {},
                "errno": r.get("errno"),
                "error": r.get("error"),
                "duration_s": r.get("duration_s"),
            }
            for r in records
        ],
    }


def aggregate_scenarios(records: list[JSON]) -> list[JSON]:
    """Scenario records of every repeat -> one scenario per name, in first-seen order."""
    by_name: dict[str, list[JSON]] = {}
    for rec in records:
        by_name.setdefault(str(rec["name"]), []).append(rec)
    return [aggregate(group) for group in by_name.values()]


def spread_of(scenario: JSON, key: str) -> int:
    """The range of ``key`` across a scenario's repeats; 0 for results without repeats."""
    value = (scenario.get("spread") or {}).get(key)
    return value if isinstance(value, int) else 0


def repeat_count(scenario: JSON) -> int:
    """How many repeats a scenario's values come from (1 for results without repeats)."""
    return len(scenario.get("repeats") or []) or 1


def value_range(scenario: JSON, key: str) -> tuple[int, int] | None:
    """Lowest and highest value of ``key`` over the repeats and the median; None without repeats.

    The median is included so that an edited or re-aggregated median still counts.
    """
    values = [
        r["metrics"][key]
        for r in scenario.get("repeats") or []
        if isinstance((r.get("metrics") or {}).get(key), int)
    ]
    median = (scenario.get("metrics") or {}).get(key)
    if len(values) < 2 or not isinstance(median, int):
        return None
    return min(*values, median), max(*values, median)


def beyond_repeat_noise(old: JSON, new: JSON, key: str) -> bool:
    """True unless both sides have repeats and their value ranges overlap.

    Overlapping ranges mean the new median lies within what the old run itself produced
    (or the reverse): the repeats cannot tell the two apart. Results without repeats leave
    the decision to the fixed threshold.
    """
    a, b = value_range(old, key), value_range(new, key)
    if a is None or b is None:
        return True
    return a[1] < b[0] or b[1] < a[0]
