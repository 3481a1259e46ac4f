"""Findings about the memfd as the pressure: serial kills, protected writers, cross-cgroup
charges, sizes beyond half of RAM, huge pages. Each answer says what was measured, no more.

Pure: reads results (kmatrix.results.oom entries, probe scenario records), renders text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from kmatrix.results.schema import JSON
from kmatrix.results.view import fmt_distribution, get_path, mib, oom_experiment, scenario

#: Answer text and comparison key (see kmatrix.report.findings.Answer); ("—", "") = not measured.
Reply = tuple[str, str]
NOTHING: Reply = ("—", "")


def _ran(cell: JSON, name: str) -> JSON | Reply:
    """The experiment entry when it has repeats; a Reply when there is nothing to show."""
    exp = oom_experiment(cell, name)
    if exp is None:
        return NOTHING
    if exp.get("status") not in (None, "ok") or not exp.get("repeats"):
        return (f"— ({exp.get('status')})", "")
    return exp


def _orders(exp: JSON) -> Counter[str]:
    return Counter(" → ".join(v) if v else "nobody" for v in exp.get("victims") or [])


#: The memfd-growth questions: (question, experiment), in report order.
SERIAL_KILLS = (
    ("growing unmapped memfd fills RAM: kills in order, ending", "oom-global-memfd-growth"),
    (
        "growing memfd, writer at oom_score_adj -1000: kills, ending",
        "oom-global-memfd-growth-protected",
    ),
    (
        "growing memfd, vm.oom_kill_allocating_task=1: kills, ending",
        "oom-global-memfd-growth-kill-allocating",
    ),
    ("growing memfd in a memory cgroup: kills, ending", "oom-memcg-v2-memfd-growth"),
    (
        "growing memfd in a memory cgroup, writer protected: kills, ending",
        "oom-memcg-v2-memfd-growth-protected",
    ),
)


def serial_kills(name: str) -> Callable[[JSON], Reply]:
    """Victims in kill order and how the repeat ended, as distributions over repeats."""

    def answer(cell: JSON) -> Reply:
        exp = _ran(cell, name)
        if not isinstance(exp, dict):
            return exp
        order = fmt_distribution(_orders(exp))
        ended = fmt_distribution(Counter(str(e) for e in exp.get("ended") or []))
        # Only where the writer died: a stalled or erroring writer still holds its memfd
        # when the harness ends the repeat, so "not freed" there says nothing.
        back = [
            b for b, e in zip(exp.get("shmem_freed") or [], exp.get("ended") or [], strict=False)
            if b is not None and str(e).endswith("-died")
        ]  # fmt: skip
        freed = f"; memfd freed {sum(back)}/{len(back)}" if back else ""
        return (f"{order}; ended: {ended}{_flood(exp)}{freed}", f"{order}|{ended}")

    return answer


def _flood(exp: JSON) -> str:
    """For stalled writers, the kernel's evidence: how often it found nothing to kill. The
    stall window is the harness's (STALL_S), so a stall without one such report on the
    console is said so: nothing there then tells a writer looping in the OOM killer from
    one that did not get the CPU. (Results that do not record the count say nothing.)"""
    counts = sorted(
        int(r["no_killable_reports"])
        for r in exp.get("runs") or []
        if str(r.get("outcome", "")).endswith("-stalled")
        and r.get("no_killable_reports") is not None
    )
    bare = counts.count(0)
    if bare == len(counts):  # none recorded, or every one without a report
        return f" ({bare} stalled with no 'no killable' report on the console)" if bare else ""
    text = f" (median {counts[len(counts) // 2]} 'no killable' reports a repeat)"
    return text + (f" ({bare} stalled with none on the console)" if bare else "")


def cross_charge(cell: JSON) -> Reply:
    """oom-memcg-cross-charge: does A keep the memfd's charge after its creator exits?"""
    exp = _ran(cell, "oom-memcg-cross-charge")
    if not isinstance(exp, dict):
        return exp
    runs = [r for r in exp.get("runs") or [] if r.get("status") == "ok"]
    kept = [get_path(r, "cross", "a_kept_charge") for r in runs]
    known = [k for k in kept if isinstance(k, bool)]
    if not known:
        return NOTHING
    first = runs[0]
    a = get_path(first, "cross", "after_handover", "cgroups", "a", "shmem")
    b = get_path(first, "cross", "after_handover", "cgroups", "b", "shmem")
    word = "yes" if all(known) else ("no" if not any(known) else "mixed")
    victims = fmt_distribution(Counter(v[0] if v else "nobody" for v in exp.get("victims") or []))
    shares = f"A shmem {mib(a)}, B {mib(b)} MiB"
    return (f"{word} {sum(known)}/{len(known)} ({shares}); A's OOM killed {victims}", word)


def _measured(cell: JSON, name: str) -> JSON | Reply:
    """The scenario record when it ran; a Reply (its error, or nothing) when it did not."""
    sc = scenario(cell, name)
    if sc is None:
        return NOTHING
    return (f"— ({str(sc['error'])[:40]})", "") if sc.get("error") else sc


def _written(cell: JSON, name: str) -> JSON | Reply:
    """A beyond-half-RAM scenario that recorded the share of MemTotal it wrote."""
    sc = _measured(cell, name)
    if isinstance(sc, dict) and not isinstance(
        get_path(sc, "detail", "written_of_mem_total"), float | int
    ):
        return NOTHING
    return sc


def beyond_half(cell: JSON) -> Reply:
    """memfd-beyond-half-ram: how far past 50 % of RAM a memfd went, with statfs evidence."""
    sc = _written(cell, "memfd-beyond-half-ram")
    if not isinstance(sc, dict):
        return sc
    share = float(sc["detail"]["written_of_mem_total"])
    blocks = get_path(sc, "detail", "f_blocks")
    evidence = f"f_blocks {blocks}" + (" = no size limit" if blocks == 0 else "")
    if sc.get("errno"):
        return (f"stopped: {sc['errno']} at {share:.0%} of RAM ({evidence})", f"yes:{sc['errno']}")
    return (f"no: wrote all {share:.0%} of RAM asked for ({evidence})", "no")


def beyond_half_strict(cell: JSON) -> Reply:
    """The same under vm.overcommit_memory=2: where the write stops, and CommitLimit."""
    sc = _written(cell, "memfd-beyond-half-ram-strict")
    if not isinstance(sc, dict):
        return sc
    share = float(sc["detail"]["written_of_mem_total"])
    limit = get_path(sc, "detail", "commit_before", "CommitLimit")
    where = f"at {share:.0%} of RAM"
    ctx = f"CommitLimit {mib(limit)} MiB"
    if sc.get("errno"):
        return (f"yes: {sc['errno']} {where} ({ctx})", f"yes:{sc['errno']}")
    return (f"no: wrote {share:.0%} of RAM ({ctx})", "no")


def hugetlb(cell: JSON) -> Reply:
    """MFD_HUGETLB usable -- asked only where huge pages were reserved first."""
    sc = _measured(cell, "memfd-hugetlb")
    if not isinstance(sc, dict):
        return NOTHING
    pages = get_path(sc, "detail", "nr_hugepages")
    if not pages:
        reserve = get_path(sc, "detail", "reserve")
        return (f"— (no huge pages reserved{f': {reserve}' if reserve else ''})", "")
    if sc.get("errno"):
        return (f"no ({sc['errno']}, nr_hugepages={pages})", f"no:{sc['errno']}")
    return (f"yes (nr_hugepages={pages})", "yes")


def hugetlb_exec_seal(cell: JSON) -> Reply:
    """MFD_HUGETLB|MFD_NOEXEC_SEAL: is the exec seal set, and is chmod +x refused?"""
    sc = _measured(cell, "memfd-hugetlb-noexec-seal")
    if not isinstance(sc, dict):
        return NOTHING
    if sc.get("errno"):
        return (f"— (memfd_create: {sc['errno']})", f"unsupported:{sc['errno']}")
    seal = get_path(sc, "detail", "seal_exec")
    chmod = get_path(sc, "detail", "fchmod_755")
    mode = get_path(sc, "detail", "mode")
    refused = chmod != "ok"
    word = "yes" if refused else "no"
    return (f"{word}: fchmod 755 {chmod} (F_SEAL_EXEC {'set' if seal else 'not set'}, mode {mode})",
            f"{word}:{bool(seal)}")  # fmt: skip


def swapped_in_oom_score(cell: JSON) -> Reply:
    """memfd-mmap-swapped: once a mapped memfd is in swap, do VmSwap and oom_score see it?"""
    sc = _measured(cell, "memfd-mmap-swapped")
    if not isinstance(sc, dict):
        return sc
    m = sc.get("metrics") or {}
    swapped, vmswap = m.get("smaps_Swap_delta"), m.get("VmSwap_delta")
    score = m.get("oom_score_delta")
    size = sc.get("size_bytes") or 0
    if not isinstance(swapped, int) or not isinstance(vmswap, int) or not size:
        return NOTHING
    if swapped < size // 2:
        return (f"— (only {mib(swapped)} MiB reached swap)", "")
    word = "yes" if vmswap >= size // 2 else "no"
    return (
        f"{word}: smaps Swap {mib(swapped)}, VmSwap {mib(vmswap)} MiB, oom_score {score:+d}",
        word,
    )
