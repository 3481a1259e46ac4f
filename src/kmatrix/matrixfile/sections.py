"""The sections of matrix.yaml other than its kernels: guest, probe, oom and archives.

Also the building blocks every model uses: sizes (``512M``), bounded values and name lists,
each check raising a ValueError whose message starts with the field it names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from kmatrix import catalog
from kmatrix.catalog import unknown_names
from kmatrix.results.contract import TcgThread
from kmatrix.units import GIB, MIB

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)
# Guest RAM the kernel and the in-RAM userland take before the probe allocates anything.
GUEST_OVERHEAD = 96 * MIB
MIN_GUEST_MEMORY = 192 * MIB
MIN_OOM_MEMORY = 144 * MIB
#: A kernel, report or merged run name: it becomes a directory (reports/NAME, work dirs).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def parse_size(value: Any) -> int:
    """Turn 512M, 64MiB, 1G or a plain byte count into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M, not a boolean")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"expected a positive size such as 512M, got {value}")
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) * _UNITS[m.group(2).lower()]
        if size <= 0:
            raise ValueError(f"expected a positive size such as 512M, got {value!r}")
        return size
    raise ValueError(f"expected a size such as 512M or 64MiB, got {value!r}")


Size = Annotated[int, BeforeValidator(parse_size)]
#: The largest guest or container memory, disk or limit kmatrix accepts.
MAX_SIZE = 64 * GIB


def within(value: int, lo: int, hi: int, field: str, unit: str = "") -> None:
    """Raise ValueError naming ``field`` unless lo <= value <= hi."""
    if not lo <= value <= hi:

        def show(v: int) -> str:
            return f"{v // MIB}M" if unit == "size" else f"{v}{unit}"

        raise ValueError(f"{field}: {show(value)} is out of range; use {show(lo)} to {show(hi)}")


def check_names(value: list[str] | str, known: tuple[str, ...], field: str, what: str) -> None:
    """Refuse unknown, duplicate or no names in a scenario/experiment list."""
    if isinstance(value, str):
        return
    if problem := unknown_names(value, known, what):
        raise ValueError(f"{field}: {problem}")
    if len(set(value)) != len(value):
        raise ValueError(f"{field}: a name is listed twice; list each once")


class Strict(BaseModel):
    """A model that refuses unknown keys and cannot change once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GuestConfig(Strict):
    """The guest userland and VM shape shared by every QEMU cell."""

    suite: str = "bookworm"
    memory: Size = 448 * MIB
    shm_size: Size = 64 * MIB
    disk_size: Size = 256 * MIB
    # vCPUs (-smp): per-CPU counters, batching and the OOM killer's timing differ on one.
    cpus: int = 2
    # How TCG runs the vCPUs: single (in turns on one host thread: faster when guests
    # outnumber the cores, see backends/qemu.py) or multi (a host thread each). KVM ignores it.
    tcg_thread: TcgThread = "single"
    # A virtio disk the guest formats as swap (0: none). It is swapped on only by the
    # scenarios and OOM experiments about swap, so every other answer stays swap-free.
    swap: Size = 0

    @model_validator(mode="after")
    def _check(self) -> GuestConfig:
        within(self.memory, MIN_GUEST_MEMORY, MAX_SIZE, "memory", "size")
        within(self.shm_size, MIB, MAX_SIZE, "shm_size", "size")
        within(self.disk_size, 64 * MIB, MAX_SIZE, "disk_size", "size")
        within(self.cpus, 1, 8, "cpus")
        if self.swap:  # 0 turns swap off
            within(self.swap, 16 * MIB, 4096 * MIB, "swap", "size")
        return self


class ProbeConfig(Strict):
    """Parameters of the probe run inside each cell."""

    # 4096 pages: still far above the noise (tens of KiB: per-CPU counter batches), and
    # ~17 % less TCG time per accounting boot than 32 MiB (measured, 6.12 alone).
    size: Size = 16 * MIB
    scenarios: list[str] | Literal["all"] = "all"
    cell_timeout: int = 900
    # Passes over the scenarios in one boot: the median is the value, the spread its noise.
    repeats: int = Field(default=3, ge=1, le=20)

    @model_validator(mode="after")
    def _check(self) -> ProbeConfig:
        within(self.size, MIB, 16 * GIB, "size", "size")
        if self.size % MIB:
            raise ValueError("size: the probe allocates whole MiB; use a multiple of 1M")
        within(self.cell_timeout, 30, 86400, "cell_timeout", " s")
        if self.scenarios == []:
            raise ValueError("scenarios: the list is empty; name scenarios or use all")
        # The probe also runs OOM experiments named here (docker cells use that).
        known = catalog.scenarios() + catalog.experiments()
        check_names(self.scenarios, known, "scenarios", "scenario(s)")
        return self


class OomConfig(Strict):
    """The OOM experiments of every QEMU cell (probes/oom.py), run in their own boots."""

    repeats: int = 3
    experiments: list[str] | Literal["all"] = "all"
    memory: Size = 192 * MIB  # guest RAM of the OOM boots (the accounting boot keeps guest.memory)
    timeout: int = 30  # seconds per repeat inside the guest before it counts as hung
    #: Boot the kernel once per cell, save it when the probe is ready, and restore every OOM
    #: boot from that (false: boot each one).
    snapshot: bool = True

    @model_validator(mode="after")
    def _check(self) -> OomConfig:
        if not 1 <= self.repeats <= 20:
            raise ValueError("repeats: must be between 1 and 20")
        if self.memory < MIN_OOM_MEMORY:
            # The initrd and its unpacked copy are both in RAM while the kernel unpacks it.
            # Measured with 2 vCPUs: the 38 MiB userland of layout 2 failed at 160M
            # ("Initramfs unpacking failed: write error"); layout 3's 22 MiB boots 7.3-rc,
            # the largest kernel, at 144M with 30 MiB left for the experiments.
            raise ValueError(
                f"memory: the OOM boots need at least {MIN_OOM_MEMORY // MIB}M (the userland "
                "is in RAM)"
            )
        within(self.memory, MIN_OOM_MEMORY, MAX_SIZE, "memory", "size")
        within(self.timeout, 5, 3600, "timeout", " s")
        # An empty list is allowed: it turns the OOM boots off.
        check_names(self.experiments, catalog.experiments(), "experiments", "OOM experiment(s)")
        return self


_URL_RE = re.compile(r"^(https?|file)://[^\s]+$")
_SUITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]*$")


def _check_suite_names(suites: list[str]) -> list[str]:
    if not suites:
        raise ValueError("the list is empty; name at least one suite, e.g. [bookworm]")
    bad = [s for s in suites if not _SUITE_RE.match(s)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a suite name (e.g. bookworm, bookworm-security)")
    if len(set(suites)) != len(suites):
        raise ValueError(f"{suites}: a suite is listed twice")
    return suites


SuiteList = Annotated[list[str], AfterValidator(_check_suite_names)]


class ArchiveConfig(Strict):
    """Another Debian-format archive (a team's kernel repository, another distribution).

    Verified like Debian's: ``dists/SUITE/InRelease`` signed by a key in ``keyring``, then the
    Packages index and the .deb by SHA256.
    """

    url: str  # the base URL, the directory holding dists/ and pool/
    keyring: Path  # the archive's public signing key(s), a binary (not armored) keyring
    suites: SuiteList | None = None  # default suites of the kernels that use this archive
    components: list[str] = ["main"]

    @model_validator(mode="after")
    def _check(self) -> ArchiveConfig:
        if not _URL_RE.match(self.url):
            raise ValueError(
                f"url: {self.url!r} is not an http://, https:// or file:// URL of the archive "
                "(the directory holding dists/)"
            )
        keyring = self.keyring.expanduser()
        if not keyring.is_file():
            raise ValueError(
                f"keyring: {keyring} does not exist; export the archive's signing key there "
                "(gpg --export KEYID > FILE)"
            )
        if keyring.read_bytes()[:5] == b"-----":
            raise ValueError(
                f"keyring: {keyring} is ASCII-armored; gpgv needs a binary keyring: "
                f"gpg --dearmor < {keyring} > {keyring.with_suffix('.gpg')}"
            )
        if not self.components:
            raise ValueError("components: the list is empty; most archives use [main]")
        return self
