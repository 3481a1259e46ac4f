"""`invoke diff`: what changed between two results files, as markdown for a pull request.

Only changes are listed: cells added or removed, changed statuses and kernel versions,
metric deltas that moved more than the noise threshold, changed errnos, and changed OOM
victim distributions. A metric change is noise unless it exceeds both the absolute
threshold (default 1 MiB) and the relative one (default 5 % of the base value): a 64 MiB
delta wobbling by 2 MiB is noise, a 0.3 MiB delta becoming 512 MiB is not. When both runs
repeated the scenario, the medians are compared and the change must also exceed the sum of
both runs' spreads across their repeats (kmatrix.results.repeats): meminfo_MemAvailable, which moves
by tens of MiB between identical runs on 6.12 and later, then stays out of the pull request
unless it really moved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kmatrix.errors import UserError
from kmatrix.results.repeats import beyond_repeat_noise
from kmatrix.results.schema import JSON, AnyResults, load_results
from kmatrix.results.view import (
    METRICS,
    fmt_distribution,
    fmt_metric,
    get_path,
    md_table,
    mib,
    oom_experiment,
    oom_names,
    scenario,
    scenario_names,
    victim_distribution,
)
from kmatrix.units import MIB

_PART_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>%|b|kib|mib|gib|pt|points)\s*$", re.I)
_UNITS = {"b": 1, "kib": 1024, "mib": MIB, "gib": 1024 * MIB}


@dataclass(frozen=True)
class Threshold:
    """The noise threshold: a change must exceed all of these to be listed."""

    bytes: int = MIB
    percent: float = 5.0
    points: int = 5  # oom_score, which is in points, not bytes

    def describe(self) -> str:
        """Human form, e.g. ``1.0 MiB and 5 %; oom_score 5 points``."""
        return f"{mib(self.bytes)} MiB and {self.percent:g} %; oom_score {self.points} points"

    def exceeded(self, metric: str, old: int, new: int) -> bool:
        """True when old -> new is more than noise."""
        floor = self.points if metric.startswith("oom_score") else self.bytes
        return abs(new - old) > max(floor, abs(old) * self.percent / 100)


def parse_threshold(text: str) -> Threshold:
    """``1MiB,5%``, ``2MiB``, ``10%`` or ``1MiB,5%,10pt``; parts not given keep their default."""
    values: dict[str, float] = {}
    for part in (p for p in text.split(",") if p.strip()):
        m = _PART_RE.match(part)
        if not m:
            raise UserError(
                f"threshold {text!r}: cannot read {part.strip()!r}; write e.g. '1MiB,5%' "
                "(bytes in B/KiB/MiB/GiB, percent with %, oom_score points with pt)"
            )
        unit = m["unit"].lower()
        key = "percent" if unit == "%" else "points" if unit in ("pt", "points") else "bytes"
        values[key] = float(m["num"]) * _UNITS.get(unit, 1)
    default = Threshold()
    return Threshold(
        bytes=int(values.get("bytes", default.bytes)),
        percent=values.get("percent", default.percent),
        points=int(values.get("points", default.points)),
    )


def _cells(results: AnyResults) -> dict[str, JSON]:
    return {str(c.get("id")): c for c in results.get("cells") or []}


def _or_dash(value: object) -> str:
    return "—" if value is None else str(value)


def _cell_changes(cid: str, old: JSON, new: JSON) -> list[str]:
    out = []
    if old.get("status") != new.get("status"):
        reason = f" ({new['reason']})" if new.get("reason") else ""
        out.append(f"`{cid}`: status {old.get('status')} → {new.get('status')}{reason}")
    for key in ("version", "sha256"):
        before, after = get_path(old, "kernel", key), get_path(new, "kernel", key)
        if before != after:
            out.append(f"`{cid}`: kernel {key} {before or '—'} → {after or '—'}")
    for key in ("accel", "tcg_thread", "qemu_slots", "memory_bytes", "backend"):
        if old.get(key) != new.get(key):
            show = mib if key == "memory_bytes" else _or_dash
            out.append(f"`{cid}`: {key} {show(old.get(key))} → {show(new.get(key))}")
    return out


def _metric_rows(cid: str, old: JSON, new: JSON, th: Threshold) -> list[list[str]]:
    rows = []
    for name in scenario_names([old, new]):
        a, b = scenario(old, name), scenario(new, name)
        if a is None or b is None:
            ran = ["—" if x is None else "ran" for x in (a, b)]
            rows.append([cid, name, "(scenario)", *ran, ""])
            continue
        for m in METRICS:
            key = f"{m}_delta"
            x, y = (a.get("metrics") or {}).get(key), (b.get("metrics") or {}).get(key)
            if isinstance(x, int) and isinstance(y, int):
                if th.exceeded(m, x, y) and beyond_repeat_noise(a, b, key):
                    change = fmt_metric(m, y - x)
                    rows.append([cid, name, m, fmt_metric(m, x), fmt_metric(m, y), _signed(change)])
            elif (x is None) != (y is None):
                rows.append([cid, name, m, fmt_metric(m, x), fmt_metric(m, y), ""])
        if (a.get("errno") or None) != (b.get("errno") or None):
            rows.append(
                [cid, name, "errno", a.get("errno") or "none", b.get("errno") or "none", ""]
            )
    return rows


def _signed(text: str) -> str:
    return text if text.startswith("-") or text == "0.0" else f"+{text}"


def _oom_rows(cid: str, old: JSON, new: JSON) -> list[list[str]]:
    rows = []
    for name in oom_names([old, new]):
        a, b = oom_experiment(old, name), oom_experiment(new, name)
        before = "—" if a is None else fmt_distribution(victim_distribution(a))
        after = "—" if b is None else fmt_distribution(victim_distribution(b))
        if before != after:
            rows.append([cid, name, "first victim", before, after])
        pa, pb = (a or {}).get("panic"), (b or {}).get("panic")
        if a is not None and b is not None and pa != pb:
            rows.append([cid, name, "panic", str(pa).lower(), str(pb).lower()])
    return rows


def render_diff(
    base: AnyResults, new: AnyResults, threshold: Threshold, base_name: str, new_name: str
) -> str:
    """Markdown listing what changed from ``base`` to ``new``; one line when nothing did."""
    old_cells, new_cells = _cells(base), _cells(new)
    cell_lines = [f"added cell `{c}`" for c in new_cells if c not in old_cells]
    cell_lines += [f"removed cell `{c}`" for c in old_cells if c not in new_cells]
    metric_rows: list[list[str]] = []
    oom_rows: list[list[str]] = []
    for cid in (c for c in new_cells if c in old_cells):
        a, b = old_cells[cid], new_cells[cid]
        cell_lines += _cell_changes(cid, a, b)
        metric_rows += _metric_rows(cid, a, b, threshold)
        oom_rows += _oom_rows(cid, a, b)
    if not (cell_lines or metric_rows or oom_rows):
        return (
            f"No changes between `{base_name}` and `{new_name}` beyond the noise threshold "
            f"({threshold.describe()}) and the repeats' spread.\n"
        )
    parts = [
        f"## kmatrix diff: `{base_name}` → `{new_name}`",
        f"Metric changes (medians of the repeats) are listed when they exceed "
        f"{threshold.describe()} and the sum of both runs' spreads; values in MiB.",
    ]
    if cell_lines:
        parts += ["### Cells", "\n".join(f"- {line}" for line in cell_lines)]
    if metric_rows:
        headers = ["cell", "scenario", "metric (Δ)", "base", "new", "change"]
        parts += ["### Accounting", md_table(metric_rows, headers)]
    if oom_rows:
        parts += ["### OOM", md_table(oom_rows, ["cell", "experiment", "what", "base", "new"])]
    return "\n\n".join(parts) + "\n"


def diff_files(base: Path, new: Path, threshold: str = "") -> str:
    """`invoke diff`: load two results files and render what changed."""
    th = parse_threshold(threshold)
    return render_diff(load_results(base), load_results(new), th, str(base), str(new))
