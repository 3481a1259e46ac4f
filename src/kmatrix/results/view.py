"""Read-only accessors over a results document, shared by report, findings, charts, check and diff.

Results are plain dicts written by several kmatrix versions and backends; every accessor here
tolerates missing keys so that a partial or older file still renders instead of crashing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from kmatrix.results.schema import JSON
from kmatrix.units import MIB

# Row order of the per-scenario tables (metric names: docs/architecture.md, "Metrics").
METRICS = (
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "VmSwap",
    "Pss",
    "smaps_Swap",
    "oom_score",
    "meminfo_Shmem",
    "meminfo_Cached",
    "meminfo_MemAvailable",
    "meminfo_Committed_AS",
    "meminfo_SwapCached",
    "meminfo_SwapUsed",
    "cgroup_current",
    "cgroup_anon",
    "cgroup_file",
    "cgroup_shmem",
    "fs_used",
)

_VERSION_RE = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def mib(value: int | float | None) -> str:
    """Bytes as MiB with one decimal; an em dash when not measured."""
    if value is None:
        return "—"
    text = f"{value / MIB:.1f}"
    # "-0.0" reads like a measurement error; a tiny negative delta is just zero.
    return "0.0" if text == "-0.0" else text


def fmt_metric(metric: str, value: int | None) -> str:
    """oom_score is in points, everything else in bytes shown as MiB."""
    if value is None:
        return "—"
    return str(value) if metric.startswith("oom_score") else mib(value)


def signed_mib(value: int | None) -> str:
    """A delta in MiB with an explicit sign (+64.0), for prose answers."""
    if value is None:
        return "—"
    text = mib(value)
    return text if text.startswith("-") else f"+{text}"


def cell_label(cell: JSON) -> str:
    """Column header: the cell id, plus where it runs when that is not an amd64 VM."""
    if cell.get("backend") == "docker":
        return f"{cell['id']} (container)"
    arch = cell.get("arch")
    if arch and arch != "amd64" and arch not in str(cell["id"]):
        return f"{cell['id']} ({arch})"
    return str(cell["id"])


def is_ok(cell: JSON) -> bool:
    """True when the cell ran the probe to the end."""
    return cell.get("status") == "ok"


def scenario(cell: JSON, name: str) -> JSON | None:
    """The named accounting scenario of a cell, or None when it was not measured."""
    for sc in cell.get("scenarios") or []:
        if isinstance(sc, dict) and sc.get("name") == name:
            return sc
    return None


def metric(cell: JSON, name: str, metric_name: str) -> int | None:
    """One metric delta (``VmRSS`` or ``VmRSS_delta``) of a scenario, or None."""
    sc = scenario(cell, name)
    if sc is None:
        return None
    key = metric_name if metric_name.endswith("_delta") else f"{metric_name}_delta"
    value = (sc.get("metrics") or {}).get(key)
    return value if isinstance(value, int) else None


def scenario_names(cells: Sequence[JSON]) -> list[str]:
    """Accounting scenario names in first-seen order across cells."""
    names: list[str] = []
    for cell in cells:
        for sc in cell.get("scenarios") or []:
            if sc.get("name") not in names:
                names.append(sc["name"])
    return names


def oom_experiment(cell: JSON, name: str) -> JSON | None:
    """The named OOM experiment of a cell, or None (older results have no ``oom`` key)."""
    for exp in cell.get("oom") or []:
        if isinstance(exp, dict) and exp.get("name") == name:
            return exp
    return None


def oom_names(cells: Sequence[JSON]) -> list[str]:
    """OOM experiment names in first-seen order across cells."""
    names: list[str] = []
    for cell in cells:
        for exp in cell.get("oom") or []:
            if isinstance(exp, dict) and exp.get("name") not in names:
                names.append(exp["name"])
    return names


def first_victims(exp: JSON) -> list[str]:
    """The role killed first in each repeat; "none" when a repeat killed nobody."""
    out: list[str] = []
    for victims in exp.get("victims") or []:
        out.append(str(victims[0]) if victims else "none")
    return out


def victim_distribution(exp: JSON) -> Counter[str]:
    """How often each role was the first victim over the repeats."""
    return Counter(first_victims(exp))


def fmt_distribution(dist: Counter[str]) -> str:
    """``hog 3/3`` or ``hog 2/3, holder 1/3``: most frequent first, ties by name."""
    total = sum(dist.values())
    if not total:
        return "—"
    ranked = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{role} {n}/{total}" for role, n in ranked)


def kernel_release(cell: JSON) -> str | None:
    """The running kernel's release (uname -r) as recorded, from the kernel or the probe."""
    release = (cell.get("kernel") or {}).get("release") or (cell.get("probe") or {}).get("release")
    return str(release) if release else None


def version_tuple(text: str) -> tuple[int, int, int] | None:
    """``6.1.0-50-cloud-amd64`` -> (6, 1, 0); None when it does not start with a version."""
    m = _VERSION_RE.match(text.strip())
    if not m:
        return None
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))


def cell_version(cell: JSON) -> tuple[int, int, int] | None:
    """The kernel version a cell ran, for kernel-range expectations."""
    release = kernel_release(cell)
    return version_tuple(release) if release else None


def get_path(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...`` or None when any level is missing or not a mapping."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def md_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], numeric: bool = False) -> str:
    """A markdown table; ``numeric`` right-aligns every column after the first.

    Cells are never parsed as numbers: tabulate would otherwise turn the kernel name
    "5.10" into 5.1 and MiB values like "64.0" into "64".
    """
    align = ["left"] + ["right" if numeric else "left"] * (len(headers) - 1)
    return tabulate(
        [list(r) for r in rows],
        list(headers),
        tablefmt="pipe",
        disable_numparse=True,
        colalign=align,
    )
