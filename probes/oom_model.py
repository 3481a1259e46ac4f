"""The documented OOM badness model, applied to /proc values read before the OOM.

mm/oom_kill.c ``oom_badness()`` (5.8 and later, unchanged through 7.x)::

    points = get_mm_rss(mm) + get_mm_counter(mm, MM_SWAPENTS)
             + mm_pgtables_bytes(mm) / PAGE_SIZE;
    adj *= totalpages / 1000;
    points += adj;

``get_mm_rss`` = MM_FILEPAGES + MM_ANONPAGES + MM_SHMEMPAGES, i.e. VmRSS in
/proc/PID/status; VmSwap is the swap entries and VmPTE the page tables. A task with
oom_score_adj -1000 is never chosen. Pages of a memfd that is not mapped are in none of
these counters, which is the whole point of the experiments.
"""

from __future__ import annotations

from accounting import ProcFile, parse_kb_fields

#: /proc/PID/status fields kept in a snapshot (bytes).
SNAPSHOT_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmPTE", "VmSwap")
OOM_SCORE_ADJ_MIN = -1000


class ProcOf:
    """/proc/PID/status, oom_score and oom_score_adj of one process, kept open so that
    snapshots taken while memory runs out allocate nothing (accounting.ProcFile)."""

    def __init__(self, pid: int) -> None:
        self.files: list[ProcFile] = []
        try:
            for name in ("status", "oom_score", "oom_score_adj"):
                self.files.append(ProcFile(f"/proc/{pid}/{name}"))
        except OSError:
            self.close()
            raise

    def snapshot(self) -> dict[str, int] | None:
        """RSS counters, page tables, oom_score and oom_score_adj, as of now.

        None when the process is gone or a zombie (a zombie's status has no VmRSS), so a
        snapshot never mixes a live process with a dead one.
        """
        status, score, adj = self.files
        try:
            fields = parse_kb_fields(status.read())
            points, adjust = int(score.read()), int(adj.read())
        except (OSError, ValueError):
            return None
        if "VmRSS" not in fields:
            return None
        snap = {name: fields.get(name, 0) for name in SNAPSHOT_FIELDS}
        snap.update(oom_score=points, oom_score_adj=adjust)
        return snap

    def close(self) -> None:
        """Close the files."""
        for f in self.files:
            f.close()


def snapshot(pid: int) -> dict[str, int] | None:
    """One :meth:`ProcOf.snapshot` of ``pid``; None when it is gone or a zombie."""
    try:
        proc = ProcOf(pid)
    except OSError:
        return None
    try:
        return proc.snapshot()
    finally:
        proc.close()


def badness(snap: dict[str, int], total_pages: int, page_size: int) -> int | None:
    """oom_badness() points from a snapshot; None for an unkillable (-1000) task."""
    adj = snap.get("oom_score_adj", 0)
    if adj == OOM_SCORE_ADJ_MIN:
        return None
    points = (snap["VmRSS"] + snap.get("VmSwap", 0)) // page_size + snap.get(
        "VmPTE", 0
    ) // page_size
    return points + adj * (total_pages // 1000)


def predict(
    snaps: dict[str, dict[str, int]], total_pages: int, page_size: int
) -> tuple[str | None, dict[str, int | None]]:
    """(role the model would kill, points per role); None when nothing is killable."""
    points = {role: badness(s, total_pages, page_size) for role, s in snaps.items()}
    killable = {role: p for role, p in points.items() if p is not None}
    if not killable:
        return None, points
    return max(killable, key=lambda role: killable[role]), points


def by_oom_score(snaps: dict[str, dict[str, int]]) -> str | None:
    """The role with the highest /proc/PID/oom_score (the kernel's own global view)."""
    killable = {
        r: s["oom_score"] for r, s in snaps.items() if s["oom_score_adj"] != OOM_SCORE_ADJ_MIN
    }
    return max(killable, key=lambda role: killable[role]) if killable else None
