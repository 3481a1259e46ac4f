"""What only the memfd-growth experiments need: their bystanders, sizes and stall detection.

A growth experiment has no holder and no hog: three bystanders hold anon memory and the
``writer`` (the driver, oom_roles.py) grows an unmapped memfd by write() until the kernel
acts. The writer may also stop without dying -- a failing write(), or a stall inside the
kernel -- which the harness tells apart from a death (oom_watch.py).
"""

from __future__ import annotations

from accounting import read_text
from oom_roles import RoleSpec

#: Bystanders of the memfd-growth experiments: anon memory, as fractions of MemAvailable
#: (global) or of the limit (memcg). Every role shares the interpreter's pages with the
#: harness (in its RSS, not charged to its cgroup); beyond them the writer holds only its
#: 2 MiB write buffer, so each bystander's anon memory must clearly exceed that: in a
#: 192M guest 8-16 MiB globally, 7-12 MiB in the memory cgroup.
BYSTANDERS = {"bystander-1": 0.10, "bystander-2": 0.15, "bystander-3": 0.20}
BYSTANDERS_MEMCG = {"bystander-1": 0.15, "bystander-2": 0.20, "bystander-3": 0.25}
#: memory.max of the memcg growth experiments, of MemAvailable: room for the bystanders,
#: the roles' own pages and some memfd before the first OOM.
LIMIT_FRACTION = 0.60
#: A writer that has not reported progress for this long while alive is stalled: under
#: TCG a 4 MiB step takes ~50 ms and a kill, reaper included, well under 0.5 s. Seen on
#: 6.12: a protected writer in a full memory cgroup with nothing killable re-enters the
#: memcg OOM killer from every page fault (thousands of "no killable processes" reports)
#: and never returns.
STALL_S = 1.5


def sizes(scope: str, base: int, writer_cap: int) -> dict[str, int]:
    """The bystanders' bytes (fractions of ``base``: MemAvailable, or the limit) and the
    most the writer will write."""
    fractions = BYSTANDERS if scope == "global" else BYSTANDERS_MEMCG
    found = {role: int(base * f) for role, f in fractions.items()}
    found["writer"] = writer_cap
    return found


def role_specs(
    sizes: dict[str, int], adj: int, writer_adj: int, procs: str | None
) -> list[RoleSpec]:
    """The bystanders, then the writer: the driver is the last role."""
    specs = [RoleSpec(r, "anon", sizes[r], adj, procs) for r in BYSTANDERS]
    return [*specs, RoleSpec("writer", "memfd-grow", sizes["writer"], writer_adj, procs)]


def stall_evidence(pid: int, quiet_s: float, late_s: float) -> dict[str, object]:
    """What a stalled driver is doing: its state, system call and wait channel; how long it
    went without progress, and how much of that the harness itself did not run (not
    counted towards the stall: oom_watch.LATE_S)."""
    found: dict[str, object] = {
        "no_progress_s": round(quiet_s, 2),
        "harness_late_s": round(late_s, 2),
    }
    for name in ("stat", "syscall", "wchan"):
        try:
            text = read_text(f"/proc/{pid}/{name}")
        except OSError:
            continue
        if name == "stat":  # "pid (comm) S ...": the state letter follows the comm
            found["state"] = text.rpartition(")")[2].split()[0]
        else:
            found[name] = text.split()[0] if text.split() else ""
    return found
