"""The OOM section of report.md: whom the OOM killer killed, per experiment and kernel.

Reads results only (cell["oom"], see kmatrix.results.oom); never runs anything. Labels,
tables, MiB and distributions come from kmatrix.results.view, as in the rest of the report.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from kmatrix.report.findings import DISAGREE_MARK
from kmatrix.results.oom import experiment_names
from kmatrix.results.schema import JSON
from kmatrix.results.view import cell_label, fmt_distribution, md_table, mib, oom_experiment

#: One line per experiment: what its holder does (docs/architecture.md, "OOM experiments").
SETUPS = {
    "oom-global-memfd-unmapped": "holder keeps a memfd filled by write(), never mapped",
    "oom-global-memfd-mapped": "holder maps and touches its memfd",
    "oom-global-tmpfile-shm": "holder keeps an unlinked O_TMPFILE on /dev/shm",
    "oom-global-shm-named": "holder writes a named /dev/shm file (killing it frees nothing)",
    "oom-global-fd-passed": "memfd passed over SCM_RIGHTS to the holder; its creator exits",
    "oom-global-memfd-swapped": "as oom-global-memfd-unmapped with swap on: the holder "
    "pushes its memfd out to swap first",
    "oom-global-memfd-growth": "a writer grows an unmapped memfd towards 2x RAM among three "
    "bystanders holding 10, 15 and 20 % of MemAvailable in anon memory; no hog",
    "oom-global-memfd-growth-protected": "as oom-global-memfd-growth, the writer at "
    "oom_score_adj -1000",
    "oom-global-memfd-growth-kill-allocating": "as oom-global-memfd-growth with "
    "vm.oom_kill_allocating_task=1",
    "oom-memcg-v2": "holder, bystander and hog in a v2 memory cgroup with memory.max",
    "oom-memcg-v2-group": "as oom-memcg-v2 with memory.oom.group=1",
    "oom-memcg-v2-memfd-growth": "as oom-global-memfd-growth inside a v2 memory cgroup "
    "(bystanders are fractions of memory.max)",
    "oom-memcg-v2-memfd-growth-protected": "as oom-memcg-v2-memfd-growth, the writer at "
    "oom_score_adj -1000",
    "oom-memcg-cross-charge": "a memfd written in cgroup A (half its limit) is passed to a "
    "receiver in cgroup B, which appends, maps and touches it; the creator exits; a hog in A "
    "then runs A out of memory",
    "oom-memcg-v1": "as oom-memcg-v2 in a v1 memory cgroup (memory.limit_in_bytes)",
    "oom-no-killable": "every process is oom_score_adj -1000: nothing can be killed",
}

#: Printed under the OOM tables: what a number there does and does not mean.
NOTES = (
    "*memory.events oom_kill* counts a memory.oom.group victim twice: mm/oom_kill.c "
    "oom_kill_process() kills the chosen task, then oom_kill_memcg_member() kills every "
    "member of the group again, the chosen one included, and each __oom_kill_process() "
    "counts MEMCG_OOM_KILL. A group of 3 therefore shows 4.",
    "*Shmem freed by the OOM*: after the victims are reaped, meminfo Shmem is no longer up "
    "by half of what the experiment's files held. *charge stayed*: the memory cgroup's "
    "memory.stat shmem still holds at least half of it after the OOM. The harness keeps no "
    "reference to any file: both can come out either way. With swap on "
    "(`oom-global-memfd-swapped`) swap used counts as the file's too, so other roles' "
    'swapped pages lean it towards "not freed".',
    "*kills the harness set off*: the kernel's report names the task whose allocation invoked "
    "each OOM (mm/oom_kill.c dump_header()); when that is the probe's own harness (a page "
    "fault of its Python process, just after a kill and before the victim's memory is back), "
    "the kill is the harness's doing, not the experiment's. The row is shown only where that "
    "happened.",
    "*kills the console lost*: roles the probe saw die by SIGKILL that have no Killed line on "
    "the console (the kernel's printk dropped it under a flood of OOM reports); the victims "
    "row lists only what the kernel printed. Shown only where it happened.",
    "*ended*: `hog-died` / `writer-died` (the driver was killed), `write-error ERRNO`, "
    "`writer-stalled` (alive, no progress for {stall_after}, counting only time in which "
    "the harness itself ran; its `stall` record has what the writer was doing and "
    "`harness_late_s`, the time the harness missed{longest_quiet}), "
    "`panic` (the boot ended: the next boot ran the remaining repeats).",
)


def distribution(outcomes: Sequence[str]) -> str:
    """``["hog", "hog", "holder"]`` -> ``"hog 2/3, holder 1/3"`` (view.fmt_distribution)."""
    return fmt_distribution(Counter(outcomes))


def _not_run(entry: JSON | None) -> str | None:
    """The cell text for an experiment that has no repeats to show, else None."""
    if entry is None:
        return "—"
    status = entry.get("status")
    if status in ("refused", "not available"):
        return "refused" if status == "refused" else "not available"
    if not entry.get("repeats"):
        return f"error: {str(entry.get('reason') or status)[:60]}"
    return None


def _victims(entry: JSON) -> str:
    if entry.get("panic") and not any(entry.get("victims", [])):
        return distribution(["panic"] * int(entry.get("repeats") or 0))
    return distribution([" → ".join(v) if v else "nobody" for v in entry.get("victims", [])])


def _count(entry: JSON, key: str) -> str:
    values = [v for v in entry.get(key, []) if v is not None]
    return f"{sum(1 for v in values if v)}/{len(values)}" if values else "—"


def _model(entry: JSON) -> str:
    return distribution([p or "—" for p in entry.get("predicted_victim", [])])


def _agree(entry: JSON) -> str:
    pairs = [
        (p, f)
        for p, f in zip(
            entry.get("predicted_victim", []), entry.get("first_victim", []), strict=False
        )
        if p is not None  # no prediction (no snapshot before a panic): nothing to compare
    ]
    return f"{sum(1 for p, f in pairs if p == f)}/{len(pairs)}" if pairs else "—"


def _memcg_kills(entry: JSON) -> str:
    values = [v for v in entry.get("memory_events_oom_kill", []) if v is not None]
    return ", ".join(str(v) for v in values) if values else "—"


def _harness_kills(entry: JSON) -> str:
    """Kills whose OOM the harness's own allocation invoked ("—": none, or not known)."""
    # A memory.oom.group victim has two Killed lines (oom_kill_process, then the group): one kill.
    kills = {(k.get("repeat"), k.get("pid")): k for k in entry.get("kills") or []}
    set_off = [k for k in kills.values() if k.get("trigger") == "harness"]
    if not set_off:
        return "—"
    roles = ", ".join(dict.fromkeys(str(k.get("role")) for k in set_off))
    return f"{len(set_off)} of {len(kills)} kills ({roles})"


def _lost_kills(entry: JSON) -> str:
    """Kills the probe saw whose Killed line the console lost ("—": none)."""
    lost = [run.get("kills_lost_from_console") or [] for run in entry.get("runs") or []]
    if not any(lost):
        return "—"
    roles = ", ".join(dict.fromkeys(str(r) for repeat in lost for r in repeat))
    return f"{sum(map(len, lost))} in {sum(1 for x in lost if x)} repeat(s) ({roles})"


def _panic(entry: JSON) -> str:
    text = "yes" if entry.get("panic") else "no"
    if entry.get("panic_expected"):
        text += " (expected)" if entry.get("panic") else " (panic expected!)"
    return text


#: Rows about the harness, not the kernel: never marked as kernels disagreeing.
NOT_KERNEL_ROWS = frozenset({"kills the harness set off", "kills the console lost"})

ROWS: tuple[tuple[str, Callable[[JSON], str]], ...] = (
    ("victims (kill order)", _victims),
    ("kills the harness set off", _harness_kills),
    ("kills the console lost", _lost_kills),
    ("model predicts", _model),
    ("model = kernel's first victim", _agree),
    ("ended", lambda e: distribution([str(x) for x in e.get("ended", [])])),
    ("holder (writer) survived", lambda e: _count(e, "holder_survived")),
    ("Shmem freed by the OOM", lambda e: _count(e, "shmem_freed")),
    ("panic", _panic),
    ("constraint", lambda e: str(e.get("constraint") or "—").removeprefix("CONSTRAINT_")),
    ("memory.events oom_kill", _memcg_kills),
    ("charge stayed after the OOM", lambda e: _count(e, "charge_stayed")),
)


def experiment_table(cells: Sequence[JSON], name: str) -> str:
    """One experiment: a row per fact, a column per cell; rows where kernels differ marked."""
    rows = []
    blocked = [_not_run(oom_experiment(cell, name)) for cell in cells]
    if all(b is not None for b in blocked):
        return ""  # nothing ran anywhere: the summary table already says why
    for label, fn in ROWS:
        values = [
            b if b is not None else fn(oom_experiment(cell, name) or {})
            for cell, b in zip(cells, blocked, strict=True)
        ]
        shown = [v for v in values if v not in ("—", "refused", "not available")]
        differ = len(set(shown)) > 1 and label not in NOT_KERNEL_ROWS
        mark = f" {DISAGREE_MARK}" if differ else ""
        if shown:  # a row that no kernel measured says nothing
            rows.append([label + mark, *values])
    return md_table(rows, ["", *(cell_label(c) for c in cells)])


def summary_table(cells: Sequence[JSON], names: Sequence[str]) -> str:
    """First victims (or panic) of every experiment at a glance."""
    rows = []
    for name in names:
        values = []
        for cell in cells:
            entry = oom_experiment(cell, name)
            blocked = _not_run(entry)
            values.append(blocked if blocked is not None else _victims(entry or {}))
        rows.append([f"`{name}`", *values])
    return md_table(rows, ["experiment", *(cell_label(c) for c in cells)])


def timing_table(cells: Sequence[JSON]) -> str:
    """How long the OOM boots of each cell took, and at what guest memory."""
    rows = []
    for c in cells:
        boots = c.get("oom_boots") or []
        if not boots:
            continue
        mem = c.get("oom_memory_bytes")
        saved = c.get("oom_snapshot") or {}
        restored = sum(1 for b in boots if b.get("restored"))
        # Kernel boots: the saving one (saved or not) and every boot that was not a restore.
        booted = len(boots) - restored + (1 if saved else 0)
        seconds = sum(float(b.get("duration_s") or 0) for b in boots)
        rows.append([
            cell_label(c),
            mib(mem) if mem else "—",
            str(booted),
            str(restored),
            str(sum(int(b.get("finished") or 0) for b in boots)),
            f"{seconds + float(saved.get('duration_s') or 0):.1f}",
        ])  # fmt: skip
    if not rows:
        return ""
    headers = ["cell", "guest MiB", "kernel boots", "restored", "repeats finished", "OOM seconds"]
    return md_table(rows, headers, numeric=True)


def container_notes(cells: Sequence[JSON]) -> list[str]:
    """One line per cell whose memcg experiments ran in a container's own cgroup."""
    notes = []
    for cell in cells:
        ran = [e for e in cell.get("oom", []) if e.get("memcg") == "container"]
        if not ran:
            continue
        adj = ran[0].get("oom_score_adj") or {}
        names = ", ".join(f"`{e['name']}`" for e in ran)
        notes.append(
            f"- **{cell_label(cell)}**: {names} ran in the "
            f"container's own {ran[0].get('cgroup_version') or ''} memory cgroup (limit = its "
            f"`--memory`; sizes are fractions of it), harness included; every role at "
            f"oom_score_adj {adj.get('roles')}, the harness at {adj.get('harness')}. Victims "
            "are the roles the harness saw die of SIGKILL, in that order (the host's kernel "
            "log is not read)."
        )
    return notes


def _recorded(cells: Sequence[JSON], key: str) -> list[float]:
    """Every OOM repeat's number under ``key``, across ``cells``."""
    return [
        r[key]
        for c in cells
        for e in c.get("oom") or []
        for r in e.get("runs") or []
        if isinstance(r.get(key), int | float)
    ]


def stall_window(cells: Sequence[JSON]) -> str:
    """How long a growth experiment's writer went without progress before it counted as
    stalled, as the repeats recorded it (a knob of the probe: the outcome depends on it)."""
    found = set(_recorded(cells, "stall_after_s"))
    if not found:
        return "a while — these results do not record how long (`stall_after_s`)"
    return " or ".join(f"{s:g} s" for s in sorted(found)) + " (the repeat's `stall_after_s`)"


def quiet_margin(cells: Sequence[JSON]) -> str:
    """The stall window's margin as the repeats measured it: the longest a writer that went
    on was quiet ("" when no repeat recorded one)."""
    quiet = _recorded(cells, "longest_quiet_s")
    if not quiet:
        return ""
    most = math.ceil(max(quiet) * 100) / 100  # up: "never longer than" must hold
    return (
        f"; a writer that went on was never quiet longer than {most:.2f} s, also counting "
        "only time in which the harness ran (`longest_quiet_s`)"
    )


def _filled(note: str, fill: dict[str, str]) -> str:
    for placeholder, text in fill.items():
        note = note.replace(placeholder, text)
    return note


def oom_section(cells: Sequence[JSON]) -> str:
    """The markdown OOM section (empty string when no cell has OOM results)."""
    names = experiment_names(cells)
    if not names:
        return ""
    shown = [c for c in cells if c.get("oom")]
    parts = [
        "## OOM experiments",
        "",
        "Each experiment repeats; a cell shows the distribution over repeats. Victims are "
        "roles in kill order from the kernel's own `Killed process` lines (console); "
        "*model* is the victim of the documented badness formula (rss + swap + page "
        "tables, oom_score_adj) applied to `/proc` values read just before the OOM. "
        f"Sizes are fractions of the OOM boots' MemAvailable; {DISAGREE_MARK} marks rows where "
        "kernels differ.",
        "",
        *([*notes, ""] if (notes := container_notes(shown)) else []),
        summary_table(shown, names),
    ]
    for name in names:
        setup = SETUPS.get(name, "")
        table = experiment_table(shown, name)
        if table:
            parts += ["", f"### `{name}`" + (f": {setup}" if setup else ""), "", table]
    fill = {"{stall_after}": stall_window(shown), "{longest_quiet}": quiet_margin(shown)}
    parts += ["", *(f"- {_filled(note, fill)}" for note in NOTES)]
    timing = timing_table(shown)
    if timing:
        parts += ["", "### OOM boots", "", timing]
    return "\n".join(parts) + "\n"
