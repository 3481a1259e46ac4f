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

from kmatrix import catalog
from kmatrix.catalog import unknown_names
from kmatrix.errors import UserError
from kmatrix.gate.expectations import ExpectationSyntaxError, parse_expectation
from kmatrix.units import GIB, MIB

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)
# Guest RAM the kernel and the in-RAM userland take before the probe allocates anything.
GUEST_OVERHEAD = 96 * 1024 * 1024
MIN_GUEST_MEMORY = 192 * 1024 * 1024
MIN_OOM_MEMORY = 192 * 1024 * 1024
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


def _within(value: int, lo: int, hi: int, field: str, unit: str = "") -> None:
    """Raise ValueError naming ``field`` unless lo <= value <= hi."""
    if not lo <= value <= hi:

        def show(v: int) -> str:
            return f"{v // MIB}M" if unit == "size" else f"{v}{unit}"

        raise ValueError(f"{field}: {show(value)} is out of range; use {show(lo)} to {show(hi)}")


def _names(value: list[str] | str, known: tuple[str, ...], field: str, what: str) -> None:
    """Refuse unknown, duplicate or no names in a scenario/experiment list."""
    if isinstance(value, str):
        return
    if problem := unknown_names(value, known, what):
        raise ValueError(f"{field}: {problem}")
    if len(set(value)) != len(value):
        raise ValueError(f"{field}: a name is listed twice; list each once")


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
    # vCPUs (-smp): per-CPU counters, batching and the OOM killer's timing differ on one.
    cpus: int = 2
    # A virtio disk the guest formats as swap (0: none). It is swapped on only by the
    # scenarios and OOM experiments about swap, so every other answer stays swap-free.
    swap: Size = 0

    @model_validator(mode="after")
    def _check(self) -> GuestConfig:
        _within(self.memory, MIN_GUEST_MEMORY, MAX_SIZE, "memory", "size")
        _within(self.shm_size, MIB, MAX_SIZE, "shm_size", "size")
        _within(self.disk_size, 64 * MIB, MAX_SIZE, "disk_size", "size")
        _within(self.cpus, 1, 8, "cpus")
        if self.swap:  # 0 turns swap off
            _within(self.swap, 16 * MIB, 4096 * MIB, "swap", "size")
        return self


class ProbeConfig(_Strict):
    """Parameters of the probe run inside each cell."""

    size: Size = 64 * MIB
    scenarios: list[str] | Literal["all"] = "all"
    cell_timeout: int = 900
    # Passes over the scenarios in one boot: the median is the value, the spread its noise.
    repeats: int = Field(default=3, ge=1, le=20)

    @model_validator(mode="after")
    def _check(self) -> ProbeConfig:
        _within(self.size, MIB, 16 * GIB, "size", "size")
        if self.size % MIB:
            raise ValueError("size: the probe allocates whole MiB; use a multiple of 1M")
        _within(self.cell_timeout, 30, 86400, "cell_timeout", " s")
        if self.scenarios == []:
            raise ValueError("scenarios: the list is empty; name scenarios or use all")
        # The probe also runs OOM experiments named here (docker cells use that).
        known = catalog.scenarios() + catalog.experiments()
        _names(self.scenarios, known, "scenarios", "scenario(s)")
        return self


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
        if self.memory < MIN_OOM_MEMORY:
            # Measured: at 160M with 2 vCPUs the kernel cannot unpack the userland
            # ("Initramfs unpacking failed: write error") and init dies.
            raise ValueError(
                f"memory: the OOM boots need at least {MIN_OOM_MEMORY // MIB}M (the userland "
                "is in RAM)"
            )
        _within(self.memory, MIN_OOM_MEMORY, MAX_SIZE, "memory", "size")
        _within(self.timeout, 5, 3600, "timeout", " s")
        # An empty list is allowed: it turns the OOM boots off.
        _names(self.experiments, catalog.experiments(), "experiments", "OOM experiment(s)")
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


class ArchiveConfig(_Strict):
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


class KernelConfig(_Strict):
    """One column of the matrix: a Debian kernel package, a local build, or the host kernel."""

    name: str
    backend: Literal["qemu", "docker"] = "qemu"
    # A release as apt sees it: bookworm is bookworm + bookworm-updates + bookworm-security,
    # the highest version wins. `suites:` instead names exactly the suites to look in.
    suite: str | None = None
    suites: SuiteList | None = None
    # Another Debian-format archive: the name of one under `archives:`, or one given here.
    archive: str | ArchiveConfig | None = None
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
        if not NAME_RE.match(self.name):
            raise ValueError(
                f"name {self.name!r} must start with a letter or digit and use only "
                "letters, digits and . _ + -"
            )
        if self.pids_limit is not None and (self.backend != "docker" or self.pids_limit < 16):
            raise ValueError("pids_limit: only for backend: docker, and at least 16")
        if self.pids_limit is not None:
            _within(self.pids_limit, 16, 65536, "pids_limit")
        if self.memory is not None:
            _within(self.memory, 64 * MIB, MAX_SIZE, "memory", "size")
        if self.shm_size is not None:
            _within(self.shm_size, MIB, MAX_SIZE, "shm_size", "size")
        if any(c in self.cmdline for c in "\n\r\0"):
            raise ValueError("cmdline: one line of kernel parameters, without line breaks")
        if self.backend == "docker":
            if self.suite or self.suites or self.archive or self.package or self.path:
                raise ValueError(
                    "a docker cell runs the host kernel: drop suite/suites/archive/package/path"
                )
            if self.arch != "amd64":
                raise ValueError("arch: a docker cell runs on the host's own architecture")
            if self.memory is None:
                # Without a limit a container's experiments could push the host itself into OOM.
                raise ValueError("memory: a docker cell needs a memory limit, e.g. memory: 512M")
            return self
        if self.path is not None:
            if self.suite or self.suites or self.archive or self.package or self.version:
                raise ValueError("give either path: (a local build) or suite:+package:, not both")
            return self
        if self.suite and self.suites:
            raise ValueError(
                f"give suite: {self.suite} (the release with its -updates and -security) or "
                "suites: (exactly those suites), not both"
            )
        has_suites = self.suite or self.suites or isinstance(self.archive, ArchiveConfig)
        if not (has_suites or self.archive) or not self.package:
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
        where = self.suite or "+".join(self.suites or [])
        if self.archive is not None:
            name = self.archive if isinstance(self.archive, str) else self.archive.url
            where = f"{name}:{where}" if where else name
        return f"{where}/{self.package}{pin}"


class Matrix(_Strict):
    """The whole matrix.yaml."""

    mirror: str | None = None
    # Debian's security archive (bookworm-security); default: the host's apt sources.
    security_mirror: str | None = None
    # Other Debian-format archives by name, for kernels' `archive:`.
    archives: dict[str, ArchiveConfig] = {}
    check_valid_until: bool = True
    keyring: Path = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    accel: Literal["auto", "tcg", "kvm"] = "tcg"
    # False: docker cells are skipped (with the reason) when no engine answers; True: error.
    require_docker: bool = False
    guest: GuestConfig = GuestConfig()
    probe: ProbeConfig = ProbeConfig()
    oom: OomConfig = OomConfig()
    kernels: list[KernelConfig]
    # Facts a release relies on, one line each (grammar in kmatrix/gate/expectations.py);
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
                self._check_archive(f"kernels[{i}] ({k.name})", k)
            elif k.shm_size is not None and k.memory is not None and k.shm_size > k.memory:
                raise ValueError(f"kernels[{i}] ({k.name}): shm_size must not exceed memory")
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

    def _check_archive(self, where: str, k: KernelConfig) -> None:
        if isinstance(k.archive, str) and k.archive not in self.archives:
            known = ", ".join(sorted(self.archives)) or "none are defined"
            raise ValueError(
                f"{where}.archive: no archive named {k.archive!r} under archives: ({known}); "
                "define it there with url: and keyring:, or give them inline"
            )
        archive = self.archive_of(k)
        if archive is not None and not (k.suite or k.suites or archive.suites):
            raise ValueError(
                f"{where}: say which suites of archive {archive.url} to use: suite:, suites: "
                "or the archive's suites:"
            )

    def archive_of(self, k: KernelConfig) -> ArchiveConfig | None:
        """The other archive a kernel comes from, or None for Debian's own archives."""
        if isinstance(k.archive, str):
            return self.archives[k.archive]
        return k.archive

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

    def select(self, names: list[str] | None, source: str = "matrix.yaml") -> list[KernelConfig]:
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


def check_local_paths(kernels: list[KernelConfig], source: str) -> None:
    """Local builds' files exist and have the right type (before anything is downloaded)."""
    for k in kernels:
        for field, path, want in (
            ("path", k.path, "file"),
            ("modules", k.modules, "dir"),
            ("config", k.config, "file"),
        ):
            if path is None:
                continue
            p = path.expanduser()
            ok = p.is_file() if want == "file" else p.is_dir()
            if not ok:
                kind = "a file" if want == "file" else "a directory"
                raise UserError(
                    f"{source}: kernels[{k.name}].{field}: {p} is not {kind}; fix the path"
                )


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _known_keys() -> list[str]:
    models: list[type[BaseModel]] = [
        Matrix, GuestConfig, ProbeConfig, OomConfig, KernelConfig, ArchiveConfig,
    ]  # fmt: skip
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
    if loc and re.match(r"^[a-z_]+: ", msg):  # a model's own check names its field
        return f"{where}.{msg}"
    return msg if not loc else f"{where}: {msg}"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in the YAML file repeats a key (YAML would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise DuplicateKeyError(f"line {line}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_matrix(text: str, source: str = "matrix.yaml") -> Matrix:
    """Parse and validate matrix.yaml text; raise UserError naming file and field on error."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise UserError(f"{source}: {exc}; keep one of them") from None
    except yaml.YAMLError as exc:
        # PyYAML's message spans lines (with a caret); one line is enough with the position.
        raise UserError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the matrix file as UTF-8"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the matrix file ({exc.strerror})") from None
    return parse_matrix(text, str(path))
