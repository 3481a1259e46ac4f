"""Parse the kernel's own account of OOM kills from a console log. Pure: text in, data out.

What mm/oom_kill.c prints, per OOM invocation (format strings quoted from the source):

* ``dump_header()``: ``"%s invoked oom-killer: gfp_mask=%#x(%pGg), order=%d,
  oom_score_adj=%hd"``, then the stack dump whose first line names the task
  (``CPU: 0 PID: 123 Comm: kmx-hog ...``; 6.11+ adds ``UID: 0`` before ``PID``), memory
  info, and (vm.oom_dump_tasks=1, the default) the task dump: ``Tasks state (memory
  values in pages):``, a header line and one ``[  pid]`` row per task. 6.8 added the
  columns ``rss_anon rss_file rss_shmem`` after ``rss``; rows are parsed by the header.
* ``dump_oom_summary()``: ``oom-kill:constraint=CONSTRAINT_...,nodemask=...,...,task=C,pid=N,
  uid=U`` (one line).
* ``__oom_kill_process()``: ``"%s: Killed process %d (%s) total-vm:%lukB, anon-rss:%lukB,
  file-rss:%lukB, shmem-rss:%lukB, UID:%u pgtables:%lukB oom_score_adj:%hd"`` where %s is
  ``Out of memory`` or ``Memory cgroup out of memory``; memory.oom.group kills print one
  such line per task after ``Tasks in /cg are going to be killed due to memory.oom.group set``.
* ``out_of_memory()`` with nothing killable: ``Out of memory and no killable processes...``
  and, for a global OOM, ``panic("System is deadlocked on memory")``.

``dump_header()`` is rate limited (10 per 5 s): a Killed line may come without a header;
it then starts an event of its own with ``header=False``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from kmatrix.units import KIB

_TS = re.compile(r"^\[\s*(\d+\.\d+)\]\s?")
#: The Killed lines of one memory.oom.group kill are printed in one go (3 ms for 3 tasks
#: under TCG); a Killed line this long after the group's last one is another OOM whose
#: header the rate limit dropped.
GROUP_BURST_S = 0.05


@dataclass(frozen=True)
class _Pattern:
    """A regular expression tried only on lines that hold its literal part ``text``: most
    console lines are none of these, and _INVOKED's leading ``.+?`` makes a failed search
    quadratic in the line's length (an OOM flood is tens of thousands of lines, and the
    host parses every boot's console)."""

    text: str
    regex: re.Pattern[str]

    def search(self, line: str) -> re.Match[str] | None:
        """The regex's match in ``line``, if its literal part is there at all."""
        return self.regex.search(line) if self.text in line else None


_INVOKED = _Pattern(" invoked oom-killer: ", re.compile(
    r"(?P<comm>.+?) invoked oom-killer: gfp_mask=(?P<gfp>0x[0-9a-f]+)\((?P<flags>[^)]*)\), "
    r"order=(?P<order>-?\d+), oom_score_adj=(?P<adj>-?\d+)"
))  # fmt: skip
_CPU = re.compile(r"^CPU: \d+ (?:UID: \d+ )?PID: (?P<pid>\d+) Comm: (?P<comm>\S+)")
_KILLED = _Pattern("Killed process ", re.compile(
    r"(?P<msg>Out of memory(?: \(oom_kill_allocating_task\))?|Memory cgroup out of memory): "
    r"Killed process (?P<pid>\d+) "
    r"\((?P<comm>.*?)\) total-vm:(?P<total_vm>\d+)kB, anon-rss:(?P<anon_rss>\d+)kB, "
    r"file-rss:(?P<file_rss>\d+)kB, shmem-rss:(?P<shmem_rss>\d+)kB, UID:(?P<uid>\d+) "
    r"pgtables:(?P<pgtables>\d+)kB oom_score_adj:(?P<adj>-?\d+)"
))  # fmt: skip
_REAPED = _Pattern("oom_reaper: reaped process ", re.compile(
    r"oom_reaper: reaped process (?P<pid>\d+) \((?P<comm>.*?)\), now anon-rss:(?P<anon>\d+)kB, "
    r"file-rss:(?P<file>\d+)kB, shmem-rss:(?P<shmem>\d+)kB"
))  # fmt: skip
_GROUP = _Pattern(" are going to be killed due to memory.oom.group set", re.compile(
    r"Tasks in (?P<cg>\S+) are going to be killed due to memory\.oom\.group set"
))  # fmt: skip
_PANIC = _Pattern(
    "Kernel panic - not syncing", re.compile(r"Kernel panic - not syncing: ?(?P<msg>.*)")
)
_ROW = re.compile(r"^\[\s*(?P<pid>\d+)\]\s+(?P<rest>.*)$")
NO_KILLABLE = "Out of memory and no killable processes"
TASKS_STATE = "Tasks state (memory values in pages):"


def panic_message(line: str) -> str | None:
    """What a ``Kernel panic - not syncing`` line says ("kernel panic" if nothing), else None."""
    m = _PANIC.search(line)
    return (m.group("msg").strip() or "kernel panic") if m else None


@dataclass
class Kill:
    """One ``Killed process`` line; sizes in bytes."""

    pid: int
    comm: str
    memcg: bool  # "Memory cgroup out of memory" rather than "Out of memory"
    total_vm: int
    anon_rss: int
    file_rss: int
    shmem_rss: int
    uid: int
    pgtables: int
    oom_score_adj: int
    reaped: bool = False
    allocating_task: bool = False  # vm.oom_kill_allocating_task chose it, not the badness


@dataclass
class OomEvent:
    """One OOM invocation as the kernel reported it."""

    header: bool = True  # False: the Killed line came without dump_header (rate limited)
    trigger_comm: str | None = None
    trigger_pid: int | None = None
    gfp_mask: str | None = None
    order: int | None = None
    constraint: dict[str, str] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    task_columns: list[str] = field(default_factory=list)
    group_memcg: str | None = None
    no_killable: bool = False
    kills: list[Kill] = field(default_factory=list)

    def pids(self) -> set[int]:
        """Every pid this event names: trigger, constraint task and victims."""
        found = {k.pid for k in self.kills}
        if self.trigger_pid is not None:
            found.add(self.trigger_pid)
        if self.constraint.get("pid", "").isdigit():
            found.add(int(self.constraint["pid"]))
        return found

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class OomLog:
    """Every OOM event of one boot's console, in order, and the panic message if any."""

    events: list[OomEvent] = field(default_factory=list)
    panic: str | None = None
    panic_line: int | None = None


def strip_prefix(line: str) -> str:
    """A console line without its ``[   12.345678]`` timestamp and trailing CR."""
    return _TS.sub("", line.rstrip("\r\n").replace("\r", ""), count=1)


def parse_constraint(text: str) -> dict[str, str]:
    """``oom-kill:constraint=X,nodemask=(null),...`` -> {"constraint": "X", ...}.

    Values never contain commas except nodemask/mems_allowed ranges like ``0-1,3``, which
    are rejoined onto the previous key.
    """
    body = text.split("oom-kill:", 1)[1]
    out: dict[str, str] = {}
    last = None
    for part in body.split(","):
        key, sep, value = part.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            out[key] = value
            last = key
        elif last is not None:
            out[last] += "," + part
    return out


def parse_task_row(columns: list[str], line: str) -> dict[str, Any] | None:
    """One task-dump row by the header's columns; None if it does not fit them."""
    m = _ROW.match(line)
    if not m:
        return None
    values = m.group("rest").split(None, len(columns) - 1)
    if len(values) != len(columns):
        return None
    row: dict[str, Any] = {"pid": int(m.group("pid"))}
    for name, value in zip(columns, values, strict=True):
        row[name] = value if name == "name" else _int(value)
    return row


def _int(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def _kill(m: re.Match[str]) -> Kill:
    def kb(name: str) -> int:
        return int(m.group(name)) * KIB

    return Kill(
        pid=int(m.group("pid")),
        comm=m.group("comm"),
        memcg=m.group("msg").startswith("Memory cgroup"),
        total_vm=kb("total_vm"),
        anon_rss=kb("anon_rss"),
        file_rss=kb("file_rss"),
        shmem_rss=kb("shmem_rss"),
        uid=int(m.group("uid")),
        pgtables=kb("pgtables"),
        oom_score_adj=int(m.group("adj")),
        allocating_task="oom_kill_allocating_task" in m.group("msg"),
    )


class _Parser:
    """Line-by-line state machine behind :func:`parse_oom_log`."""

    def __init__(self) -> None:
        self.log = OomLog()
        self.event: OomEvent | None = None
        self.columns: list[str] | None = None  # set while inside a task dump
        # A memory.oom.group kill prints its Killed lines in one burst; the first other
        # line (a reaper line aside) ends it, and a later Killed line is another OOM.
        self.group_ended = False
        self.now: float | None = None  # the current line's console timestamp
        self.last_kill: float | None = None

    def _current(self) -> OomEvent:
        if self.event is None:
            self.event = OomEvent(header=False)
            self.log.events.append(self.event)
        return self.event

    def feed(self, lineno: int, line: str) -> None:
        if self.columns is not None and self._task_line(line):
            return
        if m := _INVOKED.search(line):
            self.event = OomEvent(
                trigger_comm=m.group("comm").split()[-1],
                gfp_mask=m.group("gfp"),
                order=int(m.group("order")),
            )
            self.log.events.append(self.event)
            self.group_ended = False
        elif (m := _CPU.match(line)) and self.event is not None and self.event.trigger_pid is None:
            self.event.trigger_pid = int(m.group("pid"))
        elif TASKS_STATE in line:
            self.columns = []
        elif "oom-kill:constraint=" in line:
            self._current().constraint = parse_constraint(line)
        elif m := _KILLED.search(line):
            event = self._current()
            grouped = event.group_memcg is not None and not self.group_ended
            if grouped and self.now is not None and self.last_kill is not None:
                grouped = self.now - self.last_kill <= GROUP_BURST_S
            if (event.kills and not grouped) or event.no_killable:
                # A Killed line after an event that already ended (it killed, or found
                # nothing killable) without a new header: a rate-limited next OOM.
                event = self.event = OomEvent(header=False)
                self.log.events.append(event)
                self.group_ended = False
            event.kills.append(_kill(m))
            self.last_kill = self.now
        else:
            if self.event is not None and self.event.kills and not _REAPED.search(line):
                self.group_ended = True
            self._other(lineno, line)

    def _other(self, lineno: int, line: str) -> None:
        if m := _GROUP.search(line):
            self._current().group_memcg = m.group("cg")
            self.group_ended = False  # the group's Killed lines follow this one
        elif NO_KILLABLE in line:
            self._current().no_killable = True
        elif m := _REAPED.search(line):
            for event in self.log.events:
                for kill in event.kills:
                    if kill.pid == int(m.group("pid")):
                        kill.reaped = True
        elif (panic := panic_message(line)) and self.log.panic is None:
            self.log.panic = panic
            self.log.panic_line = lineno

    def _task_line(self, line: str) -> bool:
        """Consume a task-dump header or row; False ends the dump."""
        assert self.columns is not None
        if not self.columns and line.startswith("[  pid  ]"):
            self.columns = line.split("]", 1)[1].split()
            self._current().task_columns = self.columns
            return True
        row = parse_task_row(self.columns, line) if self.columns else None
        if row is None:
            self.columns = None
            return False
        self._current().tasks.append(row)
        return True


def parse_oom_log(text: str) -> OomLog:
    """Every OOM event in a console log (one boot), oldest first; never raises."""
    parser = _Parser()
    for lineno, raw in enumerate(text.splitlines(), 1):
        m = _TS.match(raw)
        parser.now = float(m.group(1)) if m else None
        parser.feed(lineno, strip_prefix(raw))
    return parser.log


#: OOM reports kept at each end of a flood of "no killable processes" reports.
FLOOD_KEEP = 2


def _report_blocks(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line indexes of every OOM report that killed nothing."""
    blocks, start, killed = [], None, False
    for i, raw in enumerate(lines):
        line = strip_prefix(raw)
        if _INVOKED.search(line):
            start, killed = i, False
        elif start is not None and _KILLED.search(line):
            killed = True
        elif start is not None and NO_KILLABLE in line:
            if not killed:
                blocks.append((start, i))
            start = None
    return blocks


def condense_floods(text: str) -> tuple[str, int]:
    """The console with long back-to-back runs of kill-less OOM reports cut in the middle.

    A protected task that keeps faulting in a full memory cgroup re-enters the OOM killer
    thousands of times a second ("Out of memory and no killable processes..."): the
    stored log keeps the first and last FLOOD_KEEP reports of each run and one line saying
    how many were left out. Parse the original, store this. Returns (text, reports cut).
    """
    lines = text.splitlines(keepends=True)
    runs: list[list[tuple[int, int]]] = []
    for block in _report_blocks(lines):
        if runs and block[0] - runs[-1][-1][1] <= 2:  # adjacent (at most a blank line between)
            runs[-1].append(block)
        else:
            runs.append([block])
    cut_total, out, pos = 0, [], 0
    for run in runs:
        if len(run) <= 2 * FLOOD_KEEP:
            continue
        first_cut, last_cut = run[FLOOD_KEEP][0], run[-FLOOD_KEEP - 1][1]
        n = len(run) - 2 * FLOOD_KEEP
        out += lines[pos:first_cut]
        out.append(f"[kmatrix: {n} more OOM reports like these, none killing anyone, left out]\n")
        pos, cut_total = last_cut + 1, cut_total + n
    out += lines[pos:]
    return "".join(out), cut_total
