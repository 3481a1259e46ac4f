"""The whole matrix.yaml: its sections, kernels and expectations, and the checks across them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from kmatrix.errors import UserError
from kmatrix.gate.expectations import ExpectationSyntaxError, parse_expectation
from kmatrix.matrixfile.kernels import DebianKernel, Kernel
from kmatrix.matrixfile.sections import (
    GUEST_OVERHEAD,
    MIN_GUEST_MEMORY,
    ArchiveConfig,
    GuestConfig,
    OomConfig,
    ProbeConfig,
    Strict,
)
from kmatrix.units import MIB


def _check_expectation(text: str) -> str:
    try:
        parse_expectation(text)
    except ExpectationSyntaxError as exc:
        raise ValueError(str(exc)) from None
    return text


ExpectationText = Annotated[str, AfterValidator(_check_expectation)]


class Matrix(Strict):
    """The whole matrix.yaml."""

    mirror: str | None = None
    # Debian's security archive (bookworm-security); default: the host's apt sources.
    security_mirror: str | None = None
    # Other Debian-format archives by name, for kernels' `archive:`.
    archives: dict[str, ArchiveConfig] = Field(default_factory=dict)
    check_valid_until: bool = True
    keyring: Path = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    accel: Literal["auto", "tcg", "kvm"] = "tcg"
    # False: docker cells are skipped (with the reason) when no engine answers; True: error.
    require_docker: bool = False
    guest: GuestConfig = GuestConfig()
    probe: ProbeConfig = ProbeConfig()
    oom: OomConfig = OomConfig()
    kernels: list[Kernel]
    # Facts a release relies on, one line each (grammar in kmatrix/gate/expectations.py);
    # `invoke check`, `invoke matrix` and `invoke cell` evaluate them.
    expectations: list[ExpectationText] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_kernels(self) -> Matrix:
        seen: set[str] = set()
        for i, k in enumerate(self.kernels):
            if k.name in seen:
                raise ValueError(f"kernels[{i}].name: duplicate kernel name {k.name!r}")
            seen.add(k.name)
        if not self.kernels:
            raise ValueError("kernels: the list is empty; add at least one kernel")
        for i, k in enumerate(self.kernels):
            k.check_in(self, f"kernels[{i}] ({k.name})")
        self._check_expectation_cells(seen)
        return self

    def _check_expectation_cells(self, names: set[str]) -> None:
        """An expectation naming a cell the matrix does not have could never be evaluated."""
        for i, text in enumerate(self.expectations):
            missing = [c for c in parse_expectation(text).cells if c not in names]
            if missing:
                raise ValueError(
                    f"expectations[{i}]: {text!r} names cell(s) {', '.join(missing)} that are "
                    f"not in kernels ({', '.join(sorted(names))}); fix the name or the range"
                )

    def archive_of(self, k: DebianKernel) -> ArchiveConfig | None:
        """The other archive a kernel comes from, or None for Debian's own archives."""
        if isinstance(k.archive, str):
            return self.archives[k.archive]
        return k.archive

    def check_guest_fits(self, where: str, memory: int | None, shm_size: int | None) -> None:
        """Refuse sizes the guest cannot hold: the probe would measure the OOM, not the question.

        ``memory`` and ``shm_size`` are a kernel's own, None for the guest's.
        """
        memory = memory or self.guest.memory
        shm = shm_size or self.guest.shm_size
        # The userland sits in RAM (rootfs) and the kernel needs its own share.
        usable = memory - GUEST_OVERHEAD
        mib = MIB
        if memory < MIN_GUEST_MEMORY:
            raise ValueError(
                f"{where}: guest memory {memory // mib}M is too small; use at least "
                f"{MIN_GUEST_MEMORY // mib}M"
            )
        if self.probe.size > usable // 2:
            raise ValueError(
                f"{where}: probe.size {self.probe.size // mib}M does not fit a "
                f"{memory // mib}M guest (at most {usable // 2 // mib}M); lower probe.size "
                "or raise memory"
            )
        # memfd-over-shm-limit writes /dev/shm's size + 32 MiB into memory.
        if shm + 32 * mib > usable:
            raise ValueError(
                f"{where}: shm_size {shm // mib}M + 32M does not fit a {memory // mib}M guest "
                f"(at most {(usable - 32 * mib) // mib}M); lower shm_size or raise memory"
            )
        if self.guest.disk_size < self.probe.size + 32 * mib:
            raise ValueError(
                f"guest.disk_size {self.guest.disk_size // mib}M must exceed probe.size by 32M "
                "(the disk-backed O_TMPFILE scenarios write probe.size to it)"
            )

    def select(self, names: list[str] | None, source: str = "matrix.yaml") -> list[Kernel]:
        """The kernels to run: all of them, or those named (unknown names are an error)."""
        if not names:
            return list(self.kernels)
        known = {k.name: k for k in self.kernels}
        missing = [n for n in names if n not in known]
        if missing:
            raise UserError(
                f"--kernels: unknown kernel(s) {', '.join(missing)}; {source} has: "
                f"{', '.join(known)}"
            )
        if len(set(names)) != len(names):
            raise UserError(f"--kernels {','.join(names)}: a kernel is named twice")
        return [known[n] for n in names]
