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

from kmatrix import catalog
from kmatrix.results import JSON, atomic_write_bytes
from kmatrix.view import (
    MIB,
    cell_label,
    metric,
    oom_experiment,
    oom_names,
    scenario_names,
    victim_distribution,
)

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
_METADATA = {"Date": None, "Creator": None}


@dataclass(frozen=True)
class Chart:
    """One chart file: what it shows and where it goes (relative to report.md)."""

    kind: str  # "scenario" or "oom"
    name: str
    filename: str


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def planned_charts(results: JSON) -> list[Chart]:
    """The charts a results document gets; the report links exactly these."""
    cells = [c for c in results.get("cells", []) if c.get("scenarios") or c.get("oom")]
    charts = [
        Chart("scenario", n, f"{PREFIX}{_slug(n)}.svg")
        for n in scenario_names(cells)
        if any(metric(c, n, m) is not None for c in cells for m in CHART_METRICS)
    ]
    charts += [
        Chart("oom", n, f"{PREFIX}{_slug(n)}.svg")
        for n in oom_names(cells)
        if any(victim_distribution(oom_experiment(c, n) or {}) for c in cells)
    ]
    return charts


def _scenario_figure(cells: Sequence[JSON], name: str) -> Figure:
    metrics = [m for m in CHART_METRICS if any(metric(c, name, m) is not None for c in cells)]
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    width = 0.8 / max(len(cells), 1)
    for i, cell in enumerate(cells):
        values = [(metric(cell, name, m) or 0) / MIB for m in metrics]
        xs = [j + (i - (len(cells) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, values, width, label=cell_label(cell))
    ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right")
    ax.set_ylabel("Δ MiB")
    ax.set_title(f"{name}: metric deltas per kernel")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=7, ncols=min(len(cells), 5))
    fig.tight_layout()
    return fig


def _oom_figure(cells: Sequence[JSON], name: str) -> Figure:
    fig = Figure(figsize=(6, 3.2))
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
    ax.set_title(f"{name}: first OOM victim")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_charts(results: JSON, out_dir: Path) -> list[Path]:
    """Write every planned chart into ``out_dir`` and delete stale ones left by older runs."""
    charts = planned_charts(results)
    cells = [c for c in results.get("cells", []) if c.get("scenarios") or c.get("oom")]
    written: list[Path] = []
    with matplotlib.rc_context({"svg.hashsalt": "kmatrix", "svg.fonttype": "none", "font.size": 9}):
        for chart in charts:
            if chart.kind == "scenario":
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
