"""The Findings table: one row per question, one short answer with its number per cell.

Each question is answered from the recorded metrics of one scenario or OOM experiment.
An answer carries a comparison ``key`` separate from its text, so that two kernels that
both say "no" with slightly different noise (RSS +0.3 vs +0.4 MiB) do not count as a
disagreement, while "no" against "yes" does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kmatrix.report import findings_memfd as fm
from kmatrix.results.schema import JSON
from kmatrix.results.view import (
    cell_label,
    fmt_distribution,
    get_path,
    md_table,
    metric,
    mib,
    oom_experiment,
    scenario,
    signed_mib,
    victim_distribution,
)

DISAGREE_MARK = "⚠️"


@dataclass(frozen=True)
class Answer:
    """One table entry: what the reader sees, and what is compared across cells."""

    text: str
    key: str = ""  # empty: nothing measured, never counts as a disagreement


NO_DATA = Answer("—")


def _reply(fn: Callable[[JSON], fm.Reply]) -> Callable[[JSON], Answer]:
    """A findings_memfd answer (text, key) as an Answer."""
    return lambda cell: Answer(*fn(cell))


@dataclass(frozen=True)
class Question:
    """A question the report answers for every cell."""

    text: str
    answer: Callable[[JSON], Answer]


def _counted(value: int | None, size: int | None) -> bool | None:
    # Scenario deltas carry ~0.3 MiB of interpreter noise; half of the allocated size
    # separates "the pages are counted" from "they are not" with a wide margin.
    if value is None or not size:
        return None
    return value >= size // 2


def _size(cell: JSON, name: str) -> int | None:
    size = (scenario(cell, name) or {}).get("size_bytes")
    return size if isinstance(size, int) else None


def _unmapped_memfd_in_rss(cell: JSON) -> Answer:
    rss = metric(cell, "memfd-write", "VmRSS")
    score = metric(cell, "memfd-write", "oom_score")
    counted = _counted(rss, _size(cell, "memfd-write"))
    if counted is None:
        return NO_DATA
    word = "yes" if counted else "no"
    score_text = "—" if score is None else f"{score:+d}"
    return Answer(f"{word} (RSS {signed_mib(rss)} MiB, oom_score {score_text})", word)


def _mapped_memfd_in_rss(cell: JSON) -> Answer:
    name = "memfd-mmap"
    rss = metric(cell, name, "VmRSS")
    counted = _counted(rss, _size(cell, name))
    if counted is None:
        return NO_DATA
    if not counted:
        return Answer(f"no (RSS {signed_mib(rss)} MiB)", "no")
    parts = {c: metric(cell, name, c) or 0 for c in ("RssAnon", "RssFile", "RssShmem")}
    counter = max(parts, key=lambda c: parts[c])
    score = metric(cell, name, "oom_score")
    score_text = "—" if score is None else f"{score:+d}"
    return Answer(
        f"yes, as {counter} ({signed_mib(parts[counter])} MiB, oom_score {score_text})",
        f"yes:{counter}",
    )


def _limited_by_shm(name: str) -> Callable[[JSON], Answer]:
    def answer(cell: JSON) -> Answer:
        sc = scenario(cell, name)
        if sc is None or sc.get("error"):
            return NO_DATA
        written = get_path(sc, "detail", "bytes_written")
        shm = get_path(cell, "probe", "shm_size")
        limit = f"size= {mib(shm)}" if isinstance(shm, int) else "size= unknown"
        if sc.get("errno"):
            return Answer(f"yes: {sc['errno']} at {mib(written)} MiB ({limit})", "yes")
        return Answer(f"no: wrote {mib(written)} MiB ({limit})", "no")

    return answer


def _memfd_charged_to_writer(cell: JSON) -> Answer:
    size = _size(cell, "memfd-write")
    shmem = metric(cell, "memfd-write", "cgroup_shmem")
    current = metric(cell, "memfd-write", "cgroup_current")
    shown, label = (shmem, "shmem") if shmem is not None else (current, "current")
    counted = _counted(shown, size)
    if counted is None:
        return NO_DATA
    word = "yes" if counted else "no"
    return Answer(f"{word} (cgroup {label} {signed_mib(shown)} MiB)", word)


def _first_victim(name: str) -> Callable[[JSON], Answer]:
    def answer(cell: JSON) -> Answer:
        exp = oom_experiment(cell, name)
        if exp is None:
            return NO_DATA
        if exp.get("status") not in (None, "ok"):
            # Refused (docker shares the host kernel) or failed: not an answer to compare.
            return Answer(f"— ({exp['status']})")
        dist = victim_distribution(exp)
        if not dist:
            return Answer("no victim recorded", "none")
        text = fmt_distribution(dist)
        model = exp.get("predicted_victim")
        # The model's guess is context, not part of the comparison: kernels agree when
        # they kill the same process, whatever a model predicted.
        # predicted_victim is one role per repeat, shown like the kernel's distribution.
        if isinstance(model, list):
            model = fmt_distribution(Counter(g for g in model if g)) or None
        suffix = f" (model: {model})" if model else ""
        return Answer(text + suffix, text)

    return answer


def _panic_when_unkillable(cell: JSON) -> Answer:
    exp = oom_experiment(cell, "oom-no-killable")
    if exp is None:
        return NO_DATA
    if exp.get("status") not in (None, "ok"):
        return Answer(f"— ({exp['status']})")
    panic = exp.get("panic")
    if isinstance(panic, list):
        panic = any(panic)
    if not isinstance(panic, bool):
        return NO_DATA
    return Answer("yes" if panic else "no", str(panic))


def _feature(name: str) -> Callable[[JSON], Answer]:
    def answer(cell: JSON) -> Answer:
        sc = scenario(cell, name)
        if sc is None or sc.get("error"):
            return NO_DATA
        errno = sc.get("errno")
        if not errno:
            return Answer("yes", "yes")
        failed_step = next(
            (k for k, v in (sc.get("detail") or {}).items() if v == errno and k != "errno"), None
        )
        where = f" from {failed_step}" if failed_step else ""
        # ENOMEM from a hugetlb mmap usually means no huge pages were reserved, not that
        # the kernel lacks the feature: show the reservation next to the errno.
        pages = get_path(sc, "detail", "nr_hugepages")
        extra = f", nr_hugepages={pages}" if pages is not None else ""
        return Answer(f"no ({errno}{where}{extra})", f"no:{errno}")

    return answer


QUESTIONS: tuple[Question, ...] = (
    Question("unmapped memfd (write()) counted in RSS / oom_score?", _unmapped_memfd_in_rss),
    Question("mapped memfd counted in RSS / oom_score?", _mapped_memfd_in_rss),
    Question("memfd limited by /dev/shm size?", _limited_by_shm("memfd-over-shm-limit")),
    Question("O_TMPFILE on /dev/shm limited?", _limited_by_shm("tmpfile-over-shm-limit")),
    Question("memfd charged to the writer's memory cgroup?", _memfd_charged_to_writer),
    Question(
        "first OOM victim, holder's memfd unmapped", _first_victim("oom-global-memfd-unmapped")
    ),
    Question("first OOM victim, holder's memfd mapped", _first_victim("oom-global-memfd-mapped")),
    Question("panic when nothing is killable?", _panic_when_unkillable),
    Question("MFD_NOEXEC_SEAL supported?", _feature("memfd-noexec-seal")),
    Question("MFD_HUGETLB memfd usable (huge pages reserved)?", _reply(fm.hugetlb)),
    Question("MFD_HUGETLB + MFD_NOEXEC_SEAL: chmod +x refused?", _reply(fm.hugetlb_exec_seal)),
    Question("memfd capped at half of RAM?", _reply(fm.beyond_half)),
    Question(
        "mapped memfd in swap counted in VmSwap / oom_score?", _reply(fm.swapped_in_oom_score)
    ),
    Question("memfd capped under vm.overcommit_memory=2?", _reply(fm.beyond_half_strict)),
    *(Question(text, _reply(fm.serial_kills(name))) for text, name in fm.SERIAL_KILLS),
    Question(
        "memfd charge stays with the creator's cgroup after it exits?", _reply(fm.cross_charge)
    ),
)


@dataclass(frozen=True)
class Row:
    """One answered question across cells."""

    question: str
    answers: list[Answer]

    @property
    def disagree(self) -> bool:
        """True when at least two cells measured it and their answers differ."""
        return len({a.key for a in self.answers if a.key}) > 1


def answer_all(cells: Sequence[JSON]) -> list[Row]:
    """Every question answered for every cell; disagreements first, otherwise fixed order."""
    rows = [Row(q.text, [q.answer(c) for c in cells]) for q in QUESTIONS]
    # A question no cell measured (results older than it) says nothing: leave it out.
    rows = [r for r in rows if any(a != NO_DATA for a in r.answers)]
    # sorted() is stable, so the questions keep their order within each group.
    return sorted(rows, key=lambda r: not r.disagree)


def findings_table(cells: Sequence[JSON]) -> str:
    """The Findings table in GitHub markdown."""
    rows = [
        [
            f"{DISAGREE_MARK} {r.question}" if r.disagree else r.question,
            *(a.text for a in r.answers),
        ]
        for r in answer_all(cells)
    ]
    return md_table(rows, ["question", *(cell_label(c) for c in cells)])
