"""SVG charts next to report.md, drawn from results.json with matplotlib.

Charts are review artefacts committed with the report, so they must not change when the
data did not: the SVG id salt is fixed and the date/creator metadata is dropped. Text is
kept as SVG text (not glyph paths), which keeps the files small and readable in diffs.
Only the object-oriented matplotlib API is used (no pyplot global state), because the
runner re-renders reports from worker threads.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # never open a window; reports are rendered on headless machines

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kmatrix import catalog
from kmatrix.report.findings_chart import FILENAME as FINDINGS_FILE
from kmatrix.report.findings_chart import findings_figure
from kmatrix.results.schema import JSON, AnyResults, atomic_write_bytes
from kmatrix.results.view import (
    cell_label,
    metric,
    oom_experiment,
    oom_names,
    scenario,
    scenario_names,
    victim_distribution,
)
from kmatrix.units import MIB

# Metrics drawn per accounting scenario: all in bytes (oom_score, in points, stays in the
# tables), chosen to show where the pages went: process RSS, system Shmem, cgroup, fs.
CHART_METRICS = (
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "Pss",
    "meminfo_Shmem",
    "cgroup_current",
    "cgroup_shmem",
    "fs_used",
)
ROLES = catalog.ROLES
ROLE_COLORS = {"hog": "#d62728", "holder": "#1f77b4", "bystander": "#2ca02c", "none": "#7f7f7f"}
PREFIX = "chart-"
#: A metric differing by this share of the scenario's size between cells earns a chart.
DIFFERS_SHARE = 0.25
#: ... and by more than this: a 2 MiB scenario's 0.6 MiB of interpreter noise is no finding.
DIFFERS_FLOOR = 4 * MIB
_METADATA = {"Date": None, "Creator": None}


@dataclass(frozen=True)
class Chart:
    """One chart file: what it shows and where it goes (relative to report.md)."""

    kind: str  # "findings", "scenario" or "oom"
    name: str
    filename: str


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def planned_charts(results: AnyResults) -> list[Chart]:
    """The charts a results document gets; the report links exactly these.

    The findings picture always; a scenario or OOM chart only where the cells disagree,
    since a chart of equal bars only repeats its table.
    """
    cells = [c for c in results.get("cells", []) if c.get("scenarios") or c.get("oom")]
    charts = [Chart("findings", "findings", FINDINGS_FILE)] if cells else []
    charts += [
        Chart("scenario", n, f"{PREFIX}{_slug(n)}.svg")
        for n in scenario_names(cells)
        if scenario_differs(cells, n)
    ]
    charts += [
        Chart("oom", n, f"{PREFIX}{_slug(n)}.svg")
        for n in oom_names(cells)
        if victims_differ(cells, n)
    ]
    return charts


def _share(cell: JSON, name: str, metric_name: str) -> float | None:
    """A metric as a fraction of the cell's own scenario size (sizes differ per cell)."""
    value, size = metric(cell, name, metric_name), (scenario(cell, name) or {}).get("size_bytes")
    return value / size if value is not None and isinstance(size, int) and size > 0 else None


def scenario_differs(cells: Sequence[JSON], name: str) -> bool:
    """True when some charted metric of ``name`` differs between cells by a quarter of the size.

    Relative to each cell's own size: a container with a smaller /dev/shm writes less in the
    over-limit scenarios without its kernel behaving differently.
    """
    for m in CHART_METRICS:
        shares = [v for c in cells if (v := _share(c, name, m)) is not None]
        values = [v for c in cells if (v := metric(c, name, m)) is not None]
        if (
            len(shares) >= 2
            and max(shares) - min(shares) > DIFFERS_SHARE
            and max(values) - min(values) > DIFFERS_FLOOR
        ):
            return True
    return False


def victims_differ(cells: Sequence[JSON], name: str) -> bool:
    """True when cells kill different roles first, or one cell's repeats do not agree."""
    dists = [victim_distribution(oom_experiment(c, name) or {}) for c in cells]
    dists = [d for d in dists if d]
    return len({tuple(sorted(d.items())) for d in dists}) > 1 or any(len(d) > 1 for d in dists)


def _repeat_range(cell: JSON, name: str, metric_name: str) -> tuple[float, float]:
    """How far below and above the median the repeats went, in MiB (0, 0 without repeats)."""
    key, median = f"{metric_name}_delta", metric(cell, name, metric_name)
    values = [
        r["metrics"][key]
        for r in (scenario(cell, name) or {}).get("repeats") or []
        if isinstance((r.get("metrics") or {}).get(key), int)
    ]
    if median is None or len(values) < 2:
        return 0.0, 0.0
    # Clamped: a median rounded to whole bytes may sit a byte outside an even count's range.
    return max(median - min(values), 0) / MIB, max(max(values) - median, 0) / MIB


def _scenario_figure(cells: Sequence[JSON], name: str) -> Figure:
    metrics = [m for m in CHART_METRICS if any(metric(c, name, m) is not None for c in cells)]
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(cells), 1)
    for i, cell in enumerate(cells):
        values = [(metric(cell, name, m) or 0) / MIB for m in metrics]
        ranges = [_repeat_range(cell, name, m) for m in metrics]
        xs = [j + (i - (len(cells) - 1) / 2) * width for j in range(len(metrics))]
        err = [[lo for lo, _ in ranges], [hi for _, hi in ranges]]
        ax.bar(xs, values, width, label=cell_label(cell), yerr=err, capsize=2)
    ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel("Δ MiB (whiskers: range of the repeats)")
    ax.set_title(f"{name}: metric deltas per kernel")
    ax.axhline(0, color="black", linewidth=0.6)
    # Outside the axes: a legend inside covers bars.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def _oom_figure(cells: Sequence[JSON], name: str) -> Figure:
    fig = Figure(figsize=(6.5, 3.4), layout="constrained")
    ax = fig.subplots()
    labels = [cell_label(c) for c in cells]
    dists = [victim_distribution(oom_experiment(c, name) or {}) for c in cells]
    extra = sorted({r for d in dists for r in d} - set(ROLES))
    bottom = [0] * len(cells)
    for role in (*ROLES, *extra):
        counts = [d.get(role, 0) for d in dists]
        if any(counts):
            ax.bar(labels, counts, bottom=bottom, label=role, color=ROLE_COLORS.get(role))
            bottom = [b + n for b, n in zip(bottom, counts, strict=True)]
    ax.set_ylabel("repeats")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # repeats are whole numbers
    ax.set_title(f"{name}: first OOM victim")
    ax.tick_params(axis="x", rotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def write_charts(results: AnyResults, out_dir: Path) -> list[Path]:
    """Write every planned chart into ``out_dir`` and delete stale ones left by older runs."""
    charts = planned_charts(results)
    cells = [c for c in results.get("cells", []) if c.get("scenarios") or c.get("oom")]
    written: list[Path] = []
    with matplotlib.rc_context({"svg.hashsalt": "kmatrix", "svg.fonttype": "none", "font.size": 9}):
        for chart in charts:
            if chart.kind == "findings":
                fig = findings_figure(cells)
            elif chart.kind == "scenario":
                fig = _scenario_figure([c for c in cells if c.get("scenarios")], chart.name)
            else:
                fig = _oom_figure([c for c in cells if c.get("oom")], chart.name)
            path = out_dir / chart.filename
            atomic_write_bytes(path, _svg_bytes(fig))
            written.append(path)
    keep = {p.name for p in written}
    for old in out_dir.glob(f"{PREFIX}*.svg"):
        if old.name not in keep:
            old.unlink()
    return written


def _svg_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata=_METADATA)
    return buf.getvalue()
