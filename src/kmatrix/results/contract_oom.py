"""The OOM part of the results.json contract: an experiment, its repeats, kills and boots.

See ``results.contract`` (which uses these in ``Cell``) for how the types are used and
checked; the README's "results.json" section documents every key.
"""

# No ``from __future__ import annotations``: see results.contract.
from typing import Any, Literal, NotRequired

# pydantic needs typing_extensions' TypedDict before Python 3.12.
from typing_extensions import TypedDict

OomStatus = Literal["ok", "not available", "error", "refused"]


class OomKill(TypedDict):
    """One ``Killed process`` line of the kernel's console (``results/oomlog.py``)."""

    pid: int
    comm: str
    memcg: bool
    total_vm: int
    anon_rss: int
    file_rss: int
    shmem_rss: int
    uid: int
    pgtables: int
    oom_score_adj: int
    reaped: bool
    allocating_task: bool
    role: str  # the probe's role of that pid, "other" when none
    # Whose allocation invoked the OOM that killed it: a role, "harness" (the probe itself),
    # "other", or None when the kernel's rate limit dropped the report's header.
    trigger: NotRequired[str | None]


class ExperimentKill(OomKill):
    """A kill in an experiment's ``kills``: as :class:`OomKill`, with its repeat."""

    repeat: int


class Death(TypedDict):
    """A role's death as the harness saw it (``run.died``), meminfo read right after."""

    role: str
    t: float
    shmem: NotRequired[int | None]  # absent from probes before they were recorded
    mem_available: NotRequired[int | None]


class OomKnobs(TypedDict):
    """The knobs an OOM repeat records before (``knobs``) and during (``knobs_during``) it."""

    oom_kill_allocating_task: int | None
    panic_on_oom: int | None
    overcommit_memory: int | None
    swap_total: int | None


class OomScoreAdj(TypedDict):
    """The oom_score_adj of the harness and of the roles."""

    harness: int | None
    roles: int | None


class ShmemAccount(TypedDict, total=False):
    """``run.shmem``: meminfo Shmem and swap used around one repeat."""

    baseline: int | None
    swap_baseline: int | None
    armed: int | None
    after_oom: int | None
    swap_after_oom: int | None
    after_cleanup: int | None
    restored: bool | None
    freed_by_oom: bool | None


class OomCgroup(TypedDict, total=False):
    """``run.cgroup``: the repeat's memory cgroup (empty for global experiments)."""

    version: str | None
    path: str | None
    limit: int | None
    memcg: str | None
    shmem_baseline: int | None
    current_armed: int | None
    shmem_armed: int | None
    current_after_oom: int | None
    shmem_after_oom: int | None
    current_after_exit: int | None
    current_after_cleanup: int | None
    shmem_after_cleanup: int | None
    events: dict[str, int] | None
    events_before: dict[str, int] | None
    events_total: dict[str, int] | None
    charge_stayed: bool | None
    restored: bool | None
    cleanup_error: str | None


class Stall(TypedDict, total=False):
    """``run.stall``: a writer alive but making no progress, with its /proc state."""

    no_progress_s: float
    # Of no_progress_s, how long the harness itself did not run (the guest starved on the
    # host): not counted towards the stall (probes/oom_watch.py LATE_S).
    harness_late_s: float
    state: str
    syscall: str
    wchan: str


class CrossStage(TypedDict):
    """One reading of ``oom-memcg-cross-charge``: every cgroup's charge, the receiver's RSS."""

    cgroups: dict[str, dict[str, int | None]]
    receiver_RssShmem: int | None


class Cross(TypedDict, total=False):
    """``run.cross``: the stages of ``oom-memcg-cross-charge`` (cgroups A, B, parent)."""

    before: dict[str, dict[str, int | None]]
    receiver: dict[str, Any] | None  # the receiver's ready message
    after_handover: CrossStage
    after_oom: CrossStage
    parent_before_rmdir: dict[str, int | None]
    rmdir_a: str
    memory_cgroups_after_rmdir: int | None
    parent_after_rmdir: dict[str, int | None]
    a_kept_charge: bool


class OomRepeat(TypedDict):
    """One repeat of an OOM experiment (``oom[].runs``): the probe's record merged with the
    kernel's account (``results/oom.py``, ``unit_outcome``). A repeat that never ran has
    only ``repeat``, ``status`` and ``error`` (and ``boot``, ``panic``, ``victims`` when a
    boot was meant to run it); one whose boot died under it has no probe facts."""

    repeat: int
    status: str  # the probe's (ok, error, timeout, not available) or not run/panic/crashed
    error: NotRequired[str | None]
    boot: NotRequired[int]
    panic: NotRequired[bool]
    panic_message: NotRequired[str | None]
    console_tail: NotRequired[list[str]]
    start_uptime_s: NotRequired[float | None]
    kills: NotRequired[list[OomKill]]
    constraint: NotRequired[str | None]
    no_killable: NotRequired[bool]
    no_killable_reports: NotRequired[int]
    victims: NotRequired[list[str]]
    first_victim: NotRequired[str | None]
    #: "kernel" (Killed lines) or "probe" (no line at all: the probe's SIGKILL exits).
    victims_source: NotRequired[str]
    #: Roles the probe saw die by SIGKILL that have no Killed line on the console (dropped
    #: by the kernel's printk); not in ``victims``, whose order is the kernel's.
    kills_lost_from_console: NotRequired[list[str]]
    holder_role: NotRequired[str | None]
    pids: NotRequired[dict[str, int] | None]
    sizes: NotRequired[dict[str, int] | None]
    mem_total: NotRequired[int | None]
    pre_oom: NotRequired[dict[str, dict[str, int]] | None]
    model_points: NotRequired[dict[str, int | None] | None]
    predicted_victim: NotRequired[str | None]
    predicted_by_oom_score: NotRequired[str | None]
    died: NotRequired[list[Death] | None]
    exit: NotRequired[dict[str, str] | None]
    probe_victims: NotRequired[list[str] | None]
    hog_bytes: NotRequired[int | None]
    outcome: NotRequired[str | None]
    duration_s: NotRequired[float | None]
    t_ready: NotRequired[float | None]
    t_watched: NotRequired[float | None]
    memcg: NotRequired[str | None]
    oom_score_adj: NotRequired[OomScoreAdj | None]
    knobs: NotRequired[OomKnobs | None]
    knobs_during: NotRequired[OomKnobs | None]
    writer_protected: NotRequired[bool | None]
    write_error: NotRequired[str | None]
    stall: NotRequired[Stall | None]
    stall_after_s: NotRequired[float | None]  # growth experiments: the probe's stall window
    #: Growth experiments: the longest the writer went quiet and then went on (the window's
    #: margin; probes/oom_watch.py Watch.longest_quiet_s).
    longest_quiet_s: NotRequired[float | None]
    cross: NotRequired[Cross | None]
    shmem_freed: NotRequired[bool | None]
    shmem_restored: NotRequired[bool | None]
    shmem: NotRequired[ShmemAccount]
    cgroup: NotRequired[OomCgroup]
    memory_events_oom_kill: NotRequired[int | None]
    vmstat_oom_kill: NotRequired[int | None]


class OomExperiment(TypedDict):
    """One OOM experiment of a cell (``cell.oom``), summarized over its repeats
    (``results/oom.py``, ``summarize``); a refused or failed one in a docker cell has only
    the required keys. The lists hold one value per repeat that ran."""

    name: str
    status: OomStatus
    reason: str | None
    repeats: int
    victims: list[list[str]]
    panic: bool | None
    first_victim: NotRequired[list[str | None]]
    predicted_victim: NotRequired[list[str | None]]
    panic_expected: NotRequired[bool]
    holder_survived: NotRequired[list[bool | None]]
    shmem_freed: NotRequired[list[bool | None]]
    charge_stayed: NotRequired[list[bool | None]]
    ended: NotRequired[list[str]]
    memory_events_oom_kill: NotRequired[list[int | None]]
    constraint: NotRequired[str | None]
    kills: NotRequired[list[ExperimentKill]]
    runs: NotRequired[list[OomRepeat]]
    victims_source: NotRequired[str]
    memcg: NotRequired[str | None]
    cgroup_version: NotRequired[str | None]
    oom_score_adj: NotRequired[OomScoreAdj | None]


class OomBoot(TypedDict):
    """One OOM boot of a QEMU cell (``cell.oom_boots``)."""

    index: int
    units: int
    finished: int
    mem_total: int | None
    release: str | None
    probe_uptime_s: float | None
    #: Started from the cell's saved OOM boot (``oom_snapshot``) instead of booting the kernel.
    restored: NotRequired[bool]
    duration_s: NotRequired[float]
    timed_out: NotRequired[bool]
    returncode: NotRequired[int | None]
    panic: NotRequired[str | None]


class OomSnapshot(TypedDict):
    """The boot a QEMU cell's OOM boots were restored from (``cell.oom_snapshot``).

    It booted the kernel, started the probe and was saved (QEMU migration to a file) while
    the probe waited for its plan; ``error`` says why there was no saved boot (each OOM lane
    then booted the kernel itself).
    """

    duration_s: float  # the saving boot, from QEMU's start to its exit
    save_s: float | None  # stopping the guest and writing its state
    size_bytes: int | None  # of the saved state
    error: str | None
