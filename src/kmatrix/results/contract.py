"""The results.json contract as types: one TypedDict per kind of object in the document.

``results.schema`` writes and loads documents of type :class:`Results`; the producers
(``cells/``, ``results/oom.py``, ``results/repeats.py``, ``run/``) build them through these
types, so mypy checks every key they write, and ``results.schema.load_results`` validates a
file against them with pydantic. The README's "results.json" section documents every key
(``tests/test_contract.py`` fails when the two drift apart).

A key is ``NotRequired`` when only some cells or runs have it, or when files written by
earlier kmatrix versions (``tests/fixtures/results/``) lack it. Keys the types do not know
are allowed in a loaded file (they are not checked). Objects the probe sends through
unchanged (``detail``, ``cross``, ``stall`` and the like) are typed as far as the host
relies on them; metric maps are ``dict[str, int]``.
"""

# No ``from __future__ import annotations``: TypedDict's __required_keys__ and
# __optional_keys__ are right on Python 3.11 only with evaluated annotations.
from typing import Annotated, Any, Literal, NotRequired

from pydantic import StringConstraints

# pydantic needs typing_extensions' TypedDict before Python 3.12.
from typing_extensions import TypedDict

CellStatus = Literal["ok", "incomplete", "failed", "timeout", "panic", "error", "skipped"]
Backend = Literal["qemu", "docker"]
OomStatus = Literal["ok", "not available", "error", "refused"]


class HostInfo(TypedDict):
    """``run.host`` (and a merged cell's ``host``): the machine that ran the cells."""

    kernel: str
    machine: str
    cpus: int | None
    python: str
    qemu: NotRequired[str]  # added once QEMU was asked (run/matrix.py)
    qemu_arm64: NotRequired[str]  # the QEMU that boots arm64 guests, when one did


class GuestInfo(TypedDict):
    """``run.guest``: the guest userland (package -> Debian version)."""

    suite: str
    packages: dict[str, str]
    packages_arm64: NotRequired[dict[str, str]]


class RunHeader(TypedDict):
    """``run``: one run of the matrix (or several merged)."""

    name: str
    started: str | None  # ISO 8601; None only in a merge of runs that recorded none
    finished: str | None  # None while the run is going or when it was interrupted
    kmatrix_version: str
    probe_sha256: str
    host: HostInfo
    matrix: str
    guest: NotRequired[GuestInfo]
    interrupted: NotRequired[str]
    aborted: NotRequired[str]


class KernelPackage(TypedDict):
    """One Debian package of a kernel (``kernel.packages`` by package name)."""

    version: str
    sha256: str
    suite: NotRequired[str]


class StalePin(TypedDict):
    """``kernel.stale_pin``: a pinned version older than what its suites offer now."""

    pinned: str
    newest: str
    package: str
    suite: str


class KernelInfo(TypedDict, total=False):
    """``cell.kernel``: what ran and where it came from.

    Every key is optional: a cell kmatrix failed in before it knew the kernel (or a docker
    cell without an engine) has ``{}``; a kernel that could not be resolved has only
    ``name`` and ``requested``; a docker cell has ``host_kernel``; a local build ``path``
    and its SHA256s instead of suite and packages.
    """

    name: str
    release: str | None
    config: dict[str, str]
    package: str | None
    version: str | None
    sha256: str | None
    suite: str | None
    packages: dict[str, KernelPackage] | None
    archive: str | None
    archive_url: str
    suites: list[str]
    skipped_suites: list[str]
    stale_pin: StalePin | None
    path: str
    modules: str | None
    modules_sha256: str | None
    config_file: str | None
    config_sha256: str | None
    build_sha256: str
    arch: str
    host_kernel: bool
    requested: str


class HelloKnobs(TypedDict):
    """``probe.knobs``: the settings that change answers; None where the kernel has none."""

    vcpus: int | None
    swap_total: int | None
    overcommit_memory: int | None
    overcommit_ratio: int | None
    memfd_noexec: int | None
    nr_hugepages: int | None
    oom_kill_allocating_task: int | None
    panic_on_oom: int | None
    swappiness: int | None
    thp_enabled: str | None
    shmem_enabled: str | None


class Hello(TypedDict, total=False):
    """``cell.probe``: the probe's hello record as it came (probes/README.md).

    Every key is optional: a QEMU cell whose probe never said hello records ``{}``.
    """

    type: Literal["hello"]
    probe_version: int
    release: str
    machine: str
    page_size: int
    mem_total: int | None
    cgroup: str
    cgroup_mode: str
    shm_size: int | None
    disk_fs: str | None
    python: str
    knobs: HelloKnobs
    uptime: float | None


class ScenarioRepeat(TypedDict):
    """One repeat of an accounting scenario (``scenario.repeats``)."""

    metrics: dict[str, int]
    errno: str | None
    error: str | None
    duration_s: float | None


class Scenario(TypedDict):
    """One accounting scenario of a cell (``results/repeats.py``)."""

    name: str
    size_bytes: NotRequired[int]
    metrics: dict[str, int]  # <metric>_delta: the median of the repeats
    spread: NotRequired[dict[str, int]]  # max - min per metric (absent before repeats)
    repeats: NotRequired[list[ScenarioRepeat]]
    errno: str | None
    error: str | None
    detail: NotRequired[dict[str, Any]]  # scenario-specific facts from the probe
    before: NotRequired[dict[str, int]]
    after: NotRequired[dict[str, int]]


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
    victims_source: NotRequired[str]
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
    duration_s: NotRequired[float]
    timed_out: NotRequired[bool]
    returncode: NotRequired[int | None]
    panic: NotRequired[str | None]


class Engine(TypedDict):
    """``cell.engine`` of a docker cell: the Docker engine and the probe image."""

    name: str
    version: str
    api_version: str
    kernel_release: str
    cgroup_version: str
    cgroup_driver: str
    operating_system: str
    mem_total: int
    swap_limit: bool
    image: NotRequired[str]


class Cell(TypedDict):
    """One cell: one kernel in one backend (``results.schema.new_cell`` starts it)."""

    id: Annotated[str, StringConstraints(min_length=1)]  # the kernel entry's name
    backend: Backend
    status: CellStatus
    reason: str
    accel: str | None
    duration_s: float
    memory_bytes: int | None
    kernel: KernelInfo
    scenarios: list[Scenario]
    oom: NotRequired[list[OomExperiment]]  # in every cell kmatrix writes now
    arch: NotRequired[str]
    cpu: NotRequired[str]
    boot: NotRequired[str]
    probe: NotRequired[Hello]
    console_tail: NotRequired[list[str]]
    early_crashes: NotRequired[int]
    oom_boots: NotRequired[list[OomBoot]]
    oom_memory_bytes: NotRequired[int]
    oom_duration_s: NotRequired[float]
    wall_s: NotRequired[float]
    engine: NotRequired[Engine]
    shm_size_bytes: NotRequired[int]
    cached: NotRequired[bool]
    carried_over: NotRequired[str]
    host: NotRequired[HostInfo | None]


class Results(TypedDict):
    """A results.json document."""

    schema_version: Literal[1]
    run: RunHeader
    cells: list[Cell]
