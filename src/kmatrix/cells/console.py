"""Reading a guest's serial console log: panics, the kernel release, how far boot got."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kmatrix.results.oomlog import panic_message

# init prints these so a console log alone tells how far a cell got.
INIT_MARK = "kmatrix-init:"

_VERSION_RE = re.compile(r"Linux version (\S+)")


@dataclass
class ConsoleSummary:
    """What a console log says about a boot."""

    release: str | None = None
    panic: str | None = None
    init_marks: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)

    @property
    def reached_init(self) -> bool:
        """True once our init printed anything."""
        return bool(self.init_marks)


def analyze_console(text: str, tail_lines: int = 40) -> ConsoleSummary:
    """Summarise a console log; never raises on odd input (it is whatever the guest printed)."""
    lines = text.replace("\r", "").splitlines()
    summary = ConsoleSummary(tail=lines[-tail_lines:])
    for line in lines:
        if summary.release is None and (m := _VERSION_RE.search(line)):
            summary.release = m.group(1)
        if summary.panic is None and (panic := panic_message(line)):
            summary.panic = panic
        idx = line.find(INIT_MARK)
        if idx >= 0:
            summary.init_marks.append(line[idx + len(INIT_MARK) :].strip())
    return summary
