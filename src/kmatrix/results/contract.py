"""The results.json contract as types: one TypedDict per kind of object in the document.

The OOM experiments' types are in ``results.contract_oom``. ``results.schema`` writes and
loads documents of type :class:`Results`; the producers
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

from kmatrix.results.contract_oom import OomBoot, OomExperiment, OomSnapshot

#: How TCG ran a guest's vCPUs (QEMU's ``-accel tcg,thread=``): matrix.yaml's
#: guest.tcg_thread, the QEMU command line and a TCG cell's ``tcg_thread``.
TcgThread = Literal["single", "multi"]
CellStatus = Literal["ok", "incomplete", "failed", "timeout", "panic", "error", "skipped"]
Backend = Literal["qemu", "docker"]


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
    #: The matrix file's expectation lines as the run read them at its start: what the end
    #: of `invoke matrix` checks, so an edit of the file during the run changes nothing.
    expectations: NotRequired[list[str]]
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
    cgroup2_options: NotRequired[str | None]  # older results have no such key


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
    cmdline: str | None
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
    tcg_thread: NotRequired[TcgThread]  # TCG cells only
    # QEMUs the run could have at once on the machine (backends.qemu.slot_count: the larger
    # of --jobs and cores + 1, or --runtime docker's runners at once x 2): how much its
    # guests could compete for the CPU, on which timing-dependent endings depend.
    qemu_slots: NotRequired[int]
    boot: NotRequired[str]
    probe: NotRequired[Hello]
    console_tail: NotRequired[list[str]]
    early_crashes: NotRequired[int]
    oom_boots: NotRequired[list[OomBoot]]
    oom_snapshot: NotRequired[OomSnapshot]
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
