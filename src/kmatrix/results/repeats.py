"""Repeated scenario runs: every repeat kept, the median as the value, the spread as its noise.

The probe runs the accounting scenarios in ``probe.repeats`` passes within one boot and sends
one record per scenario and pass. Here they become one results.json scenario each: ``metrics``
holds the median of every metric (what tables, checks and diffs use), ``spread`` the range
(max - min) across the repeats, and ``repeats`` the per-repeat values.
"""

from __future__ import annotations

import statistics
from collections import Counter

from kmatrix.results.contract import Scenario, ScenarioRepeat
from kmatrix.results.schema import JSON, scenario_result


def median_int(values: list[int]) -> int:
    """The median, rounded to whole bytes (an even count averages the middle two)."""
    return round(statistics.median(values))


def _majority(values: list[str | None]) -> str | None:
    """The most common value, the earliest on a tie (e.g. one repeat's errno differing)."""
    return Counter(values).most_common(1)[0][0] if values else None


def aggregate(records: list[JSON]) -> Scenario:
    """One scenario from its repeat records (same name), in repeat order.

    ``detail``, ``before`` and ``after`` are the first repeat's: they describe how the
    scenario ran, which the repeats share.
    """
    keys = sorted({k for r in records for k in (r.get("metrics") or {})})
    values = {k: [r["metrics"][k] for r in records if k in (r.get("metrics") or {})] for k in keys}
    repeats: list[ScenarioRepeat] = [
        {
            "metrics": r.get("metrics") or {},
            "errno": r.get("errno"),
            "error": r.get("error"),
            "duration_s": r.get("duration_s"),
        }
        for r in records
    ]
    scenario: Scenario = scenario_result(records[0]) | {
        "metrics": {k: median_int(v) for k, v in values.items()},
        "spread": {k: max(v) - min(v) for k, v in values.items()},
        "errno": _majority([r.get("errno") for r in records]),
        "error": _majority([r.get("error") for r in records]),
        "repeats": repeats,
    }
    return scenario


def aggregate_scenarios(records: list[JSON]) -> list[Scenario]:
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


def repeat_noise(old: JSON, new: JSON, key: str) -> int | None:
    """What the repeats show as noise for ``key``: the sum of both runs' spreads.

    Two medians whose distance is within the sum of the ranges could come from runs whose
    repeats overlap, so the repeats cannot tell them apart. None when either run has no
    repeats (results from before repeats): the fixed threshold alone decides then.
    """
    if repeat_count(old) < 2 or repeat_count(new) < 2:
        return None
    return spread_of(old, key) + spread_of(new, key)


def beyond_repeat_noise(old: JSON, new: JSON, key: str) -> bool:
    """True when the median of ``key`` moved by more than :func:`repeat_noise` (or no repeats)."""
    noise = repeat_noise(old, new, key)
    x, y = (old.get("metrics") or {}).get(key), (new.get("metrics") or {}).get(key)
    if noise is None or not isinstance(x, int) or not isinstance(y, int):
        return True
    return abs(y - x) > noise
