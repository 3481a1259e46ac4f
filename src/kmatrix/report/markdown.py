"""Render results.json into report.md (and its charts). Reads data only; never runs anything.

Section order is for a release manager reading on a code-hosting site: Findings first (the
answers, disagreements on top), then the cells, the detailed tables, the OOM section, the
charts and finally where every kernel came from.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kmatrix.config import NAME_RE
from kmatrix.errors import UserError
from kmatrix.report.charts import planned_charts, write_charts
from kmatrix.report.findings import DISAGREE_MARK, answer_all, findings_table
from kmatrix.report.findings_chart import FILENAME as FINDINGS_FILE
from kmatrix.report.oom import oom_section
from kmatrix.results.repeats import repeat_count
from kmatrix.results.schema import JSON, AnyResults, atomic_write_text, load_results
from kmatrix.results.view import (
    METRICS,
    cell_label,
    fmt_metric,
    get_path,
    md_table,
    mib,
    scenario,
    scenario_names,
)
from kmatrix.units import MIB

# Re-exported: older callers import these helpers from kmatrix.report.markdown.
__all__ = ["cell_label", "fmt_metric", "mib", "render_report", "write_report"]

#: reports/ of the directory kmatrix runs in (relative: resolved when used, not at import).
REPORTS = Path("reports")
UNITS_NOTE = (
    "Values are before→after deltas measured around each scenario, in MiB "
    "(oom_score in points); — means not measured. Raw bytes are in `results.json`."
)


def stale_note(kernel: JSON) -> str:
    """`` ⚠️ stale pin: …`` when the cell ran a pinned version older than its suites offer."""
    stale = kernel.get("stale_pin")
    if not isinstance(stale, dict):
        return ""
    return f" ⚠️ stale pin: {stale.get('newest')} in {stale.get('suite')}"


def cells_table(cells: Sequence[JSON]) -> str:
    """One row per cell: status and what ran (a stale pin is flagged next to its version)."""
    rows = []
    for c in cells:
        k = c.get("kernel") or {}
        status = str(c.get("status")) + (f": {c['reason']}" if c.get("reason") else "")
        rows.append(
            [
                c["id"],
                c.get("backend"),
                status,
                k.get("release") or "—",
                (k.get("version") or "—") + stale_note(k),
                c.get("accel") or "—",
                mib(c.get("memory_bytes")),
                f"{c.get('duration_s') or 0:.1f}",
            ]
        )
    headers = [
        "cell",
        "backend",
        "status",
        "release",
        "package version",
        "accel",
        "memory MiB",
        "s",
    ]
    return md_table(rows, headers)


#: Metrics shown in a scenario table only where some cell moved them by 1 MiB or more.
QUIET_METRICS = frozenset({"VmSwap", "smaps_Swap", "meminfo_SwapCached", "meminfo_SwapUsed"})


def scenario_table(cells: Sequence[JSON], name: str) -> str:
    """Metric deltas of one scenario: one row per metric, one column per cell."""
    rows: list[list[Any]] = []
    for m in METRICS:
        values = []
        for cell in cells:
            sc = scenario(cell, name)
            values.append(None if sc is None else (sc.get("metrics") or {}).get(f"{m}_delta"))
        if m in QUIET_METRICS and all(v is None or abs(v) < MIB for v in values):
            continue  # swap stays 0 outside the swap scenarios: a row of zeros says nothing
        if any(v is not None for v in values):
            rows.append([m, *(fmt_metric(m, v) for v in values)])
    for key in ("errno", "error"):
        found = [(scenario(c, name) or {}).get(key) for c in cells]
        if any(found):
            rows.append([key, *(v or "—" for v in found)])
    return md_table(rows, ["metric (Δ)", *(cell_label(c) for c in cells)], numeric=True)


def _header(results: AnyResults) -> str:
    run = results.get("run") or {}
    cells = results.get("cells") or []
    bad = [f"{c['id']} ({c.get('status')})" for c in cells if c.get("status") != "ok"]
    lines = [
        f"# kmatrix report: {run.get('name')}",
        "",
        f"Run {run.get('started')} → {run.get('finished') or 'unfinished'}, "
        f"kmatrix {run.get('kmatrix_version')}, {len(cells)} cell(s)"
        + (f"; not ok: {', '.join(bad)}" if bad else "; all ok")
        + ".",
    ]
    return "\n".join(lines)


def _findings(cells: Sequence[JSON]) -> str:
    rows = answer_all(cells)
    differ = sum(r.disagree for r in rows)
    summary = (
        f"{DISAGREE_MARK} marks the {differ} question(s) where cells disagree; they come first."
        if differ
        else "All cells agree on every question they measured."
    )
    picture = f"![Findings: questions by cells, coloured by answer]({FINDINGS_FILE})"
    return "\n\n".join(["## Findings", picture, summary, findings_table(cells)])


def _accounting(cells: Sequence[JSON]) -> str:
    ok = [c for c in cells if c.get("scenarios")]
    if not ok:
        return "## Accounting\n\nNo cell measured any scenario."
    note = _repeats_note(ok)
    parts = ["## Accounting", UNITS_NOTE + note]
    for name in scenario_names(ok):
        size = next((s.get("size_bytes") for c in ok if (s := scenario(c, name))), None)
        counts = {repeat_count(s) for c in ok if (s := scenario(c, name))}
        once = ", run once" if counts == {1} and note else ""
        parts += [f"### `{name}` ({mib(size)} MiB{once})", scenario_table(ok, name)]
    return "\n\n".join(parts)


def _repeats_note(cells: Sequence[JSON]) -> str:
    """How many repeats the values are medians of ('' for results without repeats)."""
    counts = sorted({repeat_count(s) for c in cells for s in c.get("scenarios") or []})
    if counts in ([], [1]):
        return ""
    if counts[0] == 1 and len(counts) > 1:  # the probe's FIRST_PASS_ONLY scenarios
        return (
            f' Each value is the median of {counts[-1]} repeats (scenarios marked "run once" '
            "fill a limit, most of RAM or swap, and run in the first pass only); every repeat "
            "and the spread are kept."
        )
    shown = f"{counts[0]} to {counts[-1]}" if len(counts) > 1 else str(counts[0])
    return f" Each value is the median of {shown} repeats; every repeat and the spread are kept."


def _charts(results: AnyResults) -> str:
    charts = planned_charts(results)
    if not charts:
        return ""
    charts = [c for c in charts if c.kind != "findings"]  # drawn at the top of the report
    if not charts:
        return ""
    parts = ["## Charts"]
    for chart in charts:
        what = "metric deltas" if chart.kind == "scenario" else "first OOM victim"
        parts.append(f"![{chart.name}: {what}]({chart.filename})")
    return "\n\n".join(parts)


def _engine(cell: JSON, run: JSON) -> str:
    """QEMU version (VM cells) or Docker engine version (container cells)."""
    if cell.get("backend") == "docker":
        version = get_path(cell, "engine", "version") or get_path(run, "host", "docker")
        cgroup = get_path(cell, "engine", "cgroup_version")
        # The cgroup version decides which memory files the container's numbers come from.
        where = f", cgroup {cgroup}" if cgroup else ""
        return f"Docker {version}{where}" if version else "Docker (version not recorded)"
    arch = cell.get("arch") or "amd64"
    qemu = get_path(run, "host", "qemu" if arch == "amd64" else f"qemu_{arch}")
    binary = "QEMU" if arch == "amd64" else f"QEMU ({arch})"
    return f"{binary} {str(qemu).removeprefix('QEMU emulator version ')}" if qemu else "—"


def _origin(cell: JSON) -> tuple[str, str]:
    """(suite, archive) a cell's kernel came from, as the report shows them."""
    k = cell.get("kernel") or {}
    if cell.get("backend") == "docker":
        return "—", "host"
    if k.get("path"):
        return "—", "local build"
    archive = str(k.get("archive") or "—")
    if k.get("archive_url"):
        archive += f" ({k['archive_url']})"
    return str(k.get("suite") or "—"), archive


def _provenance_kernels(cells: Sequence[JSON]) -> str:
    rows = []
    for c in cells:
        k = c.get("kernel") or {}
        rows.append(
            [
                c["id"],
                k.get("package") or ("host kernel" if c.get("backend") == "docker" else "—"),
                (k.get("version") or "—") + stale_note(k),
                *_origin(c),
                k.get("release") or get_path(c, "probe", "release") or "—",
                f"`{k['sha256']}`" if k.get("sha256") else "—",
            ]
        )
    headers = ["cell", "package", "version", "suite", "archive", "release", "sha256"]
    return md_table(rows, headers)


def _arch(cell: JSON, run: JSON) -> str:
    """A VM cell's Debian architecture; a container runs on the host's machine."""
    if cell.get("backend") == "docker":
        return str(get_path(run, "host", "machine") or "—")
    return str(cell.get("arch") or "—")


def _accel(cell: JSON) -> str:
    """How the cell ran: tcg (with QEMU's thread= where recorded), kvm or container."""
    accel, thread = cell.get("accel") or "—", cell.get("tcg_thread")
    return f"{accel}, thread={thread}" if thread else str(accel)


def _cmdline(cell: JSON) -> str:
    """The accounting boot's /proc/cmdline (the OOM boots add ``quiet``), as code."""
    cmdline = get_path(cell, "probe", "cmdline")
    return f"`{cmdline}`" if cmdline else "—"


def _provenance_machine(cells: Sequence[JSON], run: JSON) -> str:
    keys = sorted({key for c in cells for key in (get_path(c, "kernel", "config") or {})})
    rows: list[list[str]] = [
        [key, *(str(get_path(c, "kernel", "config", key) or "—") for c in cells)] for key in keys
    ]
    if any(c.get("arch") for c in cells):  # results from before arm64 do not record it
        rows.append(["arch", *(_arch(c, run) for c in cells)])
    rows.append(["accel", *(_accel(c) for c in cells)])
    if any(c.get("qemu_slots") for c in cells):  # older results do not record it
        rows.append(["QEMUs at once", *(str(c.get("qemu_slots") or "—") for c in cells)])
    rows += [
        ["CPU model", *(str(c.get("cpu") or "—") for c in cells)],
        ["boot entry", *(str(c.get("boot") or "—") for c in cells)],
        ["emulator / engine", *(_engine(c, run) for c in cells)],
        ["guest memory MiB", *(mib(c.get("memory_bytes")) for c in cells)],
        ["MemTotal seen MiB", *(mib(get_path(c, "probe", "mem_total")) for c in cells)],
        ["/dev/shm size MiB", *(mib(get_path(c, "probe", "shm_size")) for c in cells)],
        ["cgroup", *(str(get_path(c, "probe", "cgroup") or "—") for c in cells)],
    ]
    if any(get_path(c, "probe", "cmdline") for c in cells):  # older results have none
        rows.append(["kernel command line", *(_cmdline(c) for c in cells)])
    rows += _knob_rows(cells)
    return md_table(rows, ["", *(cell_label(c) for c in cells)])


#: The probe's hello ``knobs`` (probes/knobs.py) as Provenance rows: settings that change
#: answers, as each guest or container reported them.
KNOB_ROWS = (
    ("vCPUs", "vcpus"),
    ("swap MiB", "swap_total"),
    ("vm.overcommit_memory", "overcommit_memory"),
    ("vm.overcommit_ratio", "overcommit_ratio"),
    ("vm.memfd_noexec", "memfd_noexec"),
    ("vm.nr_hugepages", "nr_hugepages"),
    ("vm.oom_kill_allocating_task", "oom_kill_allocating_task"),
    ("vm.panic_on_oom", "panic_on_oom"),
    ("vm.swappiness", "swappiness"),
    ("THP enabled", "thp_enabled"),
    ("THP shmem_enabled", "shmem_enabled"),
    ("cgroup2 mount options", "cgroup2_options"),
)


def _knob(cell: JSON, key: str) -> str:
    knobs = get_path(cell, "probe", "knobs")
    value = get_path(cell, "probe", "knobs", key)
    if value is None:  # not recorded (no hello, an older probe), or the kernel has none
        return "—" if not isinstance(knobs, dict) or key not in knobs else "absent"
    return mib(value) if key == "swap_total" else str(value)


def _knob_rows(cells: Sequence[JSON]) -> list[list[str]]:
    if not any(get_path(c, "probe", "knobs") for c in cells):
        return []  # results from before the probe recorded them
    recorded = [get_path(c, "probe", "knobs") or {} for c in cells]
    return [
        [label, *(_knob(c, key) for c in cells)]
        for label, key in KNOB_ROWS
        if any(key in knobs for knobs in recorded)  # a knob an older probe had no row for
    ]


def _provenance(results: AnyResults) -> str:
    run = results.get("run") or {}
    cells = results.get("cells") or []
    probes = {c.get("probe_sha256") or run.get("probe_sha256") for c in cells} or {
        run.get("probe_sha256")
    }
    probe_line = (
        f"Probe SHA256 (every cell): `{probes.pop()}`"
        if len(probes) == 1
        else "Probe SHA256 per cell: "
        + ", ".join(
            f"{c['id']} `{c.get('probe_sha256') or run.get('probe_sha256')}`" for c in cells
        )
    )
    parts = [
        "## Provenance",
        _provenance_kernels(cells),
        probe_line,
        _provenance_machine(cells, run),
    ]
    guest = run.get("guest") or {}
    if guest.get("packages"):
        pkgs = ", ".join(f"{n} {v}" for n, v in sorted(guest["packages"].items()))
        parts.append(f"Guest userland ({guest.get('suite')}): {pkgs}.")
    for key in sorted(k for k in guest if k.startswith("packages_")):
        pkgs = ", ".join(f"{n} {v}" for n, v in sorted(guest[key].items()))
        parts.append(f"Guest userland ({guest.get('suite')}, {key[9:]}): {pkgs}.")
    host = run.get("host") or {}
    if host:
        parts.append(
            f"Host: {host.get('machine')}, {host.get('cpus')} CPU(s), kernel {host.get('kernel')}, "
            f"Python {host.get('python')}."
        )
    return "\n\n".join(parts)


def render_report(results: AnyResults) -> str:
    """The whole report.md as text; chart links point at the files write_report draws."""
    cells = results.get("cells") or []
    parts = [
        _header(results),
        _findings(cells),
        "## Cells\n\n" + cells_table(cells),
        _accounting(cells),
        oom_section(cells).rstrip(),
        _charts(results),
        _provenance(results),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(results: AnyResults, out_dir: Path, charts: bool = True) -> Path:
    """Write report.md (and, unless ``charts`` is false, its charts); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if charts:
        write_charts(results, out_dir)
    path = out_dir / "report.md"
    atomic_write_text(path, render_report(results))
    return path


def report_from_file(results_path: Path, name: str = "", reports_dir: Path = REPORTS) -> Path:
    """Re-render a report from a results file: next to it, or into ``reports_dir/name``.

    With a name the results file is copied there too, so that the report directory is
    self-contained like one written by ``invoke matrix --name``.
    """
    if name and not NAME_RE.match(name):
        raise UserError(
            f"report name {name!r}: use letters, digits and . _ + - only (it becomes a "
            f"directory under {reports_dir})"
        )
    results = load_results(results_path)
    target = reports_dir / name if name else results_path.parent
    target.mkdir(parents=True, exist_ok=True)
    copy = target / "results.json"
    if not copy.exists() or not copy.samefile(results_path):
        shutil.copyfile(results_path, copy)
    return write_report(results, target)
