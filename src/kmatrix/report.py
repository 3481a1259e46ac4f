"""Render results.json into report.md. Reads data only; never runs anything."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from kmatrix.results import JSON

MIB = 1024 * 1024

# Row order of the per-scenario tables (DESIGN.md metric names).
METRICS = (
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "Pss",
    "oom_score",
    "meminfo_Shmem",
    "meminfo_Cached",
    "meminfo_MemAvailable",
    "meminfo_Committed_AS",
    "cgroup_current",
    "cgroup_anon",
    "cgroup_file",
    "cgroup_shmem",
    "fs_used",
)


def mib(value: int | None) -> str:
    """Bytes as MiB with one decimal; an em dash when not measured."""
    if value is None:
        return "—"
    return f"{value / MIB:.1f}"


def fmt_metric(metric: str, value: int | None) -> str:
    """oom_score is in points, everything else in bytes shown as MiB."""
    if value is None:
        return "—"
    return str(value) if metric == "oom_score" else mib(value)


def cell_label(cell: JSON) -> str:
    """Column header: the cell id, plus where it runs when that is not a VM."""
    if cell.get("backend") == "docker":
        return f"{cell['id']} (host kernel, container)"
    return str(cell["id"])


def _scenario_names(cells: Sequence[JSON]) -> list[str]:
    names: list[str] = []
    for cell in cells:
        for sc in cell.get("scenarios", []):
            if sc["name"] not in names:
                names.append(sc["name"])
    return names


def _scenario(cell: JSON, name: str) -> JSON | None:
    return next((s for s in cell.get("scenarios", []) if s["name"] == name), None)


def cells_table(cells: Sequence[JSON]) -> str:
    """One row per cell: status and what ran."""
    rows = []
    for c in cells:
        k = c.get("kernel", {})
        rows.append(
            [
                c["id"],
                c.get("backend"),
                c.get("status") + (f": {c['reason']}" if c.get("reason") else ""),
                k.get("release") or "—",
                k.get("version") or "—",
                c.get("accel") or "—",
                mib(c.get("memory_bytes")),
                f"{c.get('duration_s', 0):.1f}",
            ]
        )
    headers = ["cell", "backend", "status", "release", "package version", "accel", "memory MiB", "s"]
    return tabulate(rows, headers, tablefmt="github")


def scenario_table(cells: Sequence[JSON], name: str) -> str:
    """Metric deltas of one scenario: one row per metric, one column per cell."""
    rows: list[list[Any]] = []
    for metric in METRICS:
        values = []
        for cell in cells:
            sc = _scenario(cell, name)
            values.append(None if sc is None else sc["metrics"].get(f"{metric}_delta"))
        if any(v is not None for v in values):
            rows.append([metric, *(fmt_metric(metric, v) for v in values)])
    errnos = [(_scenario(c, name) or {}).get("errno") for c in cells]
    if any(errnos):
        rows.append(["errno", *(e or "—" for e in errnos)])
    errors = [(_scenario(c, name) or {}).get("error") for c in cells]
    if any(errors):
        rows.append(["error", *(e or "—" for e in errors)])
    return tabulate(rows, ["metric (Δ)", *(cell_label(c) for c in cells)], tablefmt="github")


def provenance_table(cells: Sequence[JSON]) -> str:
    """Where every kernel came from, with hashes and the config values that matter."""
    rows = []
    for c in cells:
        k = c.get("kernel", {})
        config = ", ".join(f"{key.removeprefix('CONFIG_')}={v}" for key, v in k.get("config", {}).items())
        rows.append([c["id"], k.get("package") or "—", k.get("version") or "—", k.get("sha256") or "—", config or "—"])
    return tabulate(rows, ["cell", "package", "version", "sha256", "config"], tablefmt="github")


def render_report(results: JSON) -> str:
    """The whole report.md."""
    run = results["run"]
    cells = results["cells"]
    ok = [c for c in cells if c.get("scenarios")]
    parts = [
        f"# kmatrix report: {run['name']}",
        "",
        f"Run {run.get('started')} → {run.get('finished') or 'unfinished'}, kmatrix "
        f"{run.get('kmatrix_version')}, probe sha256 `{str(run.get('probe_sha256'))[:16]}…`, "
        f"{run.get('host', {}).get('qemu') or 'QEMU not used'}.",
        "",
        "Values are before→after deltas measured around each scenario, in MiB "
        "(oom_score in points); — means not measured. Raw bytes are in `results.json`.",
        "",
        "## Cells",
        "",
        cells_table(cells),
        "",
        "## Accounting",
    ]
    for name in _scenario_names(ok):
        size = next((s.get("size_bytes") for c in ok if (s := _scenario(c, name))), None)
        parts += ["", f"### `{name}` ({mib(size)} MiB)", "", scenario_table(ok, name)]
    parts += ["", "## Provenance", "", provenance_table(cells), ""]
    return "\n".join(parts)
