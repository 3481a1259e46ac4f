"""matrix.yaml -> validated, typed configuration.

Validation happens before anything is downloaded or booted, and every problem is reported
as one message naming the file, the field and the fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from kmatrix.errors import UserError
from kmatrix.expectations import ExpectationSyntaxError, parse_expectation

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)
# Guest RAM the kernel and the in-RAM userland take before the probe allocates anything.
GUEST_OVERHEAD = 96 * 1024 * 1024
MIN_GUEST_MEMORY = 192 * 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

MIB = 1024 * 1024


def parse_size(value: Any) -> int:
    """Turn 512M, 64MiB, 1G or a plain byte count into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size such as 512M or 64MiB, got {value!r}")


Size = Annotated[int, BeforeValidator(parse_size)]


def _check_expectation(text: str) -> str:
    try:
        parse_expectation(text)
    except ExpectationSyntaxError as exc:
        raise ValueError(str(exc)) from None
    return text


ExpectationText = Annotated[str, AfterValidator(_check_expectation)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GuestConfig(_Strict):
    """The guest userland and VM shape shared by every QEMU cell."""

    suite: str = "bookworm"
    memory: Size = 512 * MIB
    shm_size: Size = 128 * MIB
    disk_size: Size = 256 * MIB


class ProbeConfig(_Strict):
    """Parameters of the probe run inside each cell."""

    size: Size = 64 * MIB
    scenarios: list[str] | Literal["all"] = "all"
    cell_timeout: int = 900
    # Passes over the scenarios in one boot: the median is the value, the spread its noise.
    repeats: int = Field(default=3, ge=1, le=20)


class OomConfig(_Strict):
    """The OOM experiments of every QEMU cell (probes/oom.py), run in their own boots."""

    repeats: int = 3
    experiments: list[str] | Literal["all"] = "all"
    memory: Size = 192 * MIB  # guest RAM of the OOM boots (the accounting boot keeps guest.memory)
    timeout: int = 30  # seconds per repeat inside the guest before it counts as hung

    @model_validator(mode="after")
    def _check(self) -> OomConfig:
        if not 1 <= self.repeats <= 20:
            raise ValueError("repeats: must be between 1 and 20")
        if self.memory < 160 * MIB:
            raise ValueError("memory: the OOM boots need at least 160M (the userland is in RAM)")
        return self


class KernelConfig(_Strict):
    """One column of the matrix: a Debian kernel package, a local build, or the host kernel."""

    name: str
    backend: Literal["qemu", "docker"] = "qemu"
    suite: str | None = None
    package: str | None = None
    version: str | None = None
    path: Path | None = None
    modules: Path | None = None
    config: Path | None = None
    memory: Size | None = None
    shm_size: Size | None = None
    pids_limit: int | None = None  # docker cells: most processes the container may have
    cmdline: str = ""  # qemu cells: extra kernel command line, e.g. transparent_hugepage=never
    # qemu cells: the Debian architecture of the kernel and of its guest userland (arm64
    # boots under qemu-system-aarch64, always TCG on an x86 host).
    arch: Literal["amd64", "arm64"] = "amd64"

    @model_validator(mode="after")
    def _check_source(self) -> KernelConfig:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"name {self.name!r} must start with a letter or digit and use only "
                "letters, digits and . _ + -"
            )
        if self.pids_limit is not None and (self.backend != "docker" or self.pids_limit < 16):
            raise ValueError("pids_limit: only for backend: docker, and at least 16")
        if self.backend == "docker":
            if self.suite or self.package or self.path:
                raise ValueError("a docker cell runs the host kernel: drop suite/package/path")
            if self.arch != "amd64":
                raise ValueError("arch: a docker cell runs on the host's own architecture")
            if self.memory is None:
                # Without a limit a container's experiments could push the host itself into OOM.
                raise ValueError("memory: a docker cell needs a memory limit, e.g. memory: 512M")
            return self
        if self.path is not None:
            if self.suite or self.package or self.version:
                raise ValueError("give either path: (a local build) or suite:+package:, not both")
            return self
        if not (self.suite and self.package):
            raise ValueError("a qemu kernel needs suite: and package: (or path: to a local build)")
        return self

    @property
    def source(self) -> str:
        """Human-readable origin, used in progress lines and errors."""
        if self.backend == "docker":
            return "host kernel (docker)"
        if self.path is not None:
            return f"local build {self.path}"
        pin = f"={self.version}" if self.version else ""
        return f"{self.suite}/{self.package}{pin}"


class Matrix(_Strict):
    """The whole matrix.yaml."""

    mirror: str | None = None
    check_valid_until: bool = True
    keyring: Path = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    accel: Literal["auto", "tcg", "kvm"] = "tcg"
    # False: docker cells are skipped (with the reason) when no engine answers; True: error.
    require_docker: bool = False
    guest: GuestConfig = GuestConfig()
    probe: ProbeConfig = ProbeConfig()
    oom: OomConfig = OomConfig()
    kernels: list[KernelConfig]
    # Facts a release relies on, one line each (grammar in kmatrix/expectations.py);
    # `invoke check` and the end of `invoke matrix` evaluate them.
    expectations: list[ExpectationText] = []

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
            if k.backend == "qemu":
                self._check_guest_fits(f"kernels[{i}] ({k.name})", k)
        return self

    def _check_guest_fits(self, where: str, k: KernelConfig) -> None:
        """Refuse sizes the guest cannot hold: the probe would measure the OOM, not the question."""
        memory = k.memory or self.guest.memory
        shm = k.shm_size or self.guest.shm_size
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

    def select(self, names: list[str] | None) -> list[KernelConfig]:
        """The kernels to run: all of them, or those named (unknown names are an error)."""
        if not names:
            return list(self.kernels)
        known = {k.name: k for k in self.kernels}
        missing = [n for n in names if n not in known]
        if missing:
            raise UserError(
                f"unknown kernel(s) {', '.join(missing)}; matrix.yaml has: {', '.join(known)}"
            )
        return [known[n] for n in names]


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _known_keys() -> list[str]:
    models: list[type[BaseModel]] = [Matrix, GuestConfig, ProbeConfig, OomConfig, KernelConfig]
    return sorted({name for m in models for name in m.model_fields})


def _describe(err: Any) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    where = _loc(loc)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "remove it"
        return f"{where}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg if not loc else f"{where}: {msg}"


def parse_matrix(text: str, source: str = "matrix.yaml") -> Matrix:
    """Parse and validate matrix.yaml text; raise UserError naming file and field on error."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with a kernels: list at the top level")
    try:
        return Matrix.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise UserError(f"{source}: " + "; ".join(lines)) from None


def load_matrix(path: Path) -> Matrix:
    """Read and validate a matrix file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the matrix file ({exc.strerror})") from None
    return parse_matrix(text, str(path))
