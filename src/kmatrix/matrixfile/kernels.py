"""The kernel entries of matrix.yaml: one small class per kind of kernel.

- :class:`DebianKernel` — a package of a Debian-format archive: ``suite:`` or ``suites:`` or
  ``archive:``, and ``package:`` (``version:`` pins it);
- :class:`LocalKernel` — a kernel you built: ``path:`` (``modules:``, ``config:``);
- :class:`DockerKernel` — the host's own kernel in a container: ``backend: docker``.

The YAML does not name the kind: :func:`kernel_kind` reads it from the keys an entry has
always had (``backend: docker``, else ``path:``, else a package), so every matrix file reads
as before. Each class validates its own fields, refuses the other kinds' fields with a
message saying why, and checks what needs the whole matrix in ``check_in``. What a kernel
becomes at run time (a ``PreparedKernel``, a container) is kmatrix.guest.kernels' and
kmatrix.cells' business, not this module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Tag, model_validator

from kmatrix.errors import UserError
from kmatrix.matrixfile.sections import (
    MAX_SIZE,
    NAME_RE,
    ArchiveConfig,
    Size,
    Strict,
    SuiteList,
    within,
)
from kmatrix.units import MIB

if TYPE_CHECKING:
    from kmatrix.matrixfile.matrix import Matrix

_SOURCES = "suite/suites/archive/package/path"
_PIDS_LIMIT = "pids_limit: only for backend: docker, and at least 16"
_BOTH = "give either path: (a local build) or suite:+package:, not both"


class _KernelEntry(Strict):
    """What every kernel entry has: a name (the cell's id), sizes and an architecture."""

    name: str
    shm_size: Size | None = None
    # qemu cells: the Debian architecture of the kernel and of its guest userland (arm64
    # boots under qemu-system-aarch64, always TCG on an x86 host).
    arch: Literal["amd64", "arm64"] = "amd64"

    #: Keys of the other kinds, each with the message that refuses it here ("" for the
    #: kind's one message, which names them all).
    foreign: ClassVar[dict[str, str]] = {}
    #: The one message for the keys mapped to "".
    foreign_message: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _refuse_foreign(cls, data: Any) -> Any:
        """Another kind's keys get this kind's reason, not "unknown key"; null ones are dropped."""
        if not isinstance(data, dict):
            return data
        given = [k for k in cls.foreign if data.get(k) is not None]
        if given:
            raise ValueError(cls.foreign[given[0]] or cls.foreign_message)
        cls._check_raw(data)
        return {k: v for k, v in data.items() if k not in cls.foreign}

    @classmethod
    def _check_raw(cls, data: dict[str, Any]) -> None:
        """Checks of the raw entry before its fields are validated (none by default)."""

    @model_validator(mode="after")
    def _check_entry(self) -> _KernelEntry:
        if not NAME_RE.match(self.name):
            raise ValueError(
                f"name {self.name!r} must start with a letter or digit and use only "
                "letters, digits and . _ + -"
            )
        self._check()
        return self

    def _check_shm_size(self) -> None:
        if self.shm_size is not None:
            within(self.shm_size, MIB, MAX_SIZE, "shm_size", "size")

    def _check(self) -> None:
        """The kind's own checks, after the fields are validated."""

    def check_in(self, matrix: Matrix, where: str) -> None:
        """Checks that need the whole matrix (``where`` names the entry in messages)."""

    def check_files(self, source: str) -> None:
        """That the files the entry names exist (run before anything is downloaded)."""

    @property
    def source(self) -> str:
        """Human-readable origin, used in progress lines and errors."""
        raise NotImplementedError


class _QemuKernel(_KernelEntry):
    """A kernel booted under QEMU with the guest userland."""

    backend: Literal["qemu"] = "qemu"
    memory: Size | None = None  # guest RAM of the accounting boot; default guest.memory
    cmdline: str = ""  # extra kernel command line, e.g. transparent_hugepage=never

    @classmethod
    def _check_raw(cls, data: dict[str, Any]) -> None:
        if data.get("backend", "qemu") != "qemu":
            raise ValueError("backend: Input should be 'qemu' or 'docker'")

    def _check(self) -> None:
        if self.memory is not None:
            within(self.memory, 64 * MIB, MAX_SIZE, "memory", "size")
        self._check_shm_size()
        if any(c in self.cmdline for c in "\n\r\0"):
            raise ValueError("cmdline: one line of kernel parameters, without line breaks")

    def check_in(self, matrix: Matrix, where: str) -> None:
        matrix.check_guest_fits(where, self.memory, self.shm_size)


class DebianKernel(_QemuKernel):
    """A kernel package of Debian's archives or of another Debian-format archive."""

    # A release as apt sees it: bookworm is bookworm + bookworm-updates + bookworm-security,
    # the highest version wins. `suites:` instead names exactly the suites to look in.
    suite: str | None = None
    suites: SuiteList | None = None
    # Another Debian-format archive: the name of one under `archives:`, or one given here.
    archive: str | ArchiveConfig | None = None
    package: str = ""  # required: the check below says so with the fix
    version: str | None = None

    foreign: ClassVar[dict[str, str]] = {
        "path": _BOTH,  # only ever null here: a path makes the entry a LocalKernel
        "pids_limit": _PIDS_LIMIT,
        "modules": "modules: only for a local build (path:); a package brings its own modules",
        "config": "config: only for a local build (path:); a package brings its own .config",
    }

    def _check(self) -> None:
        super()._check()
        if self.suite and self.suites:
            raise ValueError(
                f"give suite: {self.suite} (the release with its -updates and -security) or "
                "suites: (exactly those suites), not both"
            )
        if not (self.suite or self.suites or self.archive) or not self.package:
            raise ValueError("a qemu kernel needs suite: and package: (or path: to a local build)")

    def check_in(self, matrix: Matrix, where: str) -> None:
        super().check_in(matrix, where)
        if isinstance(self.archive, str) and self.archive not in matrix.archives:
            known = ", ".join(sorted(matrix.archives)) or "none are defined"
            raise ValueError(
                f"{where}.archive: no archive named {self.archive!r} under archives: ({known}); "
                "define it there with url: and keyring:, or give them inline"
            )
        archive = matrix.archive_of(self)
        if archive is not None and not (self.suite or self.suites or archive.suites):
            raise ValueError(
                f"{where}: say which suites of archive {archive.url} to use: suite:, suites: "
                "or the archive's suites:"
            )

    @property
    def source(self) -> str:
        pin = f"={self.version}" if self.version else ""
        where = self.suite or "+".join(self.suites or [])
        if self.archive is not None:
            name = self.archive if isinstance(self.archive, str) else self.archive.url
            where = f"{name}:{where}" if where else name
        return f"{where}/{self.package}{pin}"


class LocalKernel(_QemuKernel):
    """A kernel you built: a bzImage, and optionally its installed modules and .config."""

    path: Path
    modules: Path | None = None
    config: Path | None = None

    foreign: ClassVar[dict[str, str]] = {
        "suite": _BOTH, "suites": _BOTH, "archive": _BOTH, "package": _BOTH, "version": _BOTH,
        "pids_limit": _PIDS_LIMIT,
    }  # fmt: skip

    def check_files(self, source: str) -> None:
        for field, path, want in (
            ("path", self.path, "file"),
            ("modules", self.modules, "dir"),
            ("config", self.config, "file"),
        ):
            if path is None:
                continue
            p = path.expanduser()
            if not (p.is_file() if want == "file" else p.is_dir()):
                kind = "a file" if want == "file" else "a directory"
                raise UserError(
                    f"{source}: kernels[{self.name}].{field}: {p} is not {kind}; fix the path"
                )

    @property
    def source(self) -> str:
        return f"local build {self.path}"


class DockerKernel(_KernelEntry):
    """The host's own kernel, the probe in a container under explicit limits."""

    backend: Literal["docker"]
    # Required (0 until validated): without a limit a container's experiments could push
    # the host itself into OOM.
    memory: Size = 0
    pids_limit: int | None = None  # most processes the container may have

    foreign: ClassVar[dict[str, str]] = {
        **dict.fromkeys(_SOURCES.split("/"), ""),
        "version": "version: a docker cell runs the host kernel; drop version",
        "modules": "modules: a docker cell runs the host kernel; drop modules",
        "config": "config: a docker cell runs the host kernel; drop config",
        "cmdline": "cmdline: a docker cell runs the host kernel, booted already; drop cmdline",
    }
    foreign_message: ClassVar[str] = f"a docker cell runs the host kernel: drop {_SOURCES}"

    def _check(self) -> None:
        if self.pids_limit is not None:
            if self.pids_limit < 16:
                raise ValueError(_PIDS_LIMIT)
            within(self.pids_limit, 16, 65536, "pids_limit")
        if self.arch != "amd64":
            raise ValueError("arch: a docker cell runs on the host's own architecture")
        if not self.memory:
            raise ValueError("memory: a docker cell needs a memory limit, e.g. memory: 512M")
        within(self.memory, 64 * MIB, MAX_SIZE, "memory", "size")
        self._check_shm_size()

    def check_in(self, matrix: Matrix, where: str) -> None:
        if self.shm_size is not None and self.shm_size > self.memory:
            raise ValueError(f"{where}: shm_size must not exceed memory")

    @property
    def source(self) -> str:
        return "host kernel (docker)"


#: The tags :func:`kernel_kind` gives; they appear in pydantic's error locations.
KERNEL_TAGS = ("debian", "local", "docker")


def kernel_kind(data: Any) -> str | None:
    """Which class an entry is, from the keys matrix files have always used."""
    if isinstance(data, _KernelEntry):
        return {DebianKernel: "debian", LocalKernel: "local", DockerKernel: "docker"}[type(data)]
    if not isinstance(data, dict):
        return None
    if data.get("backend") == "docker":
        return "docker"
    return "local" if data.get("path") is not None else "debian"


#: One kernel entry of matrix.yaml, whichever kind.
Kernel = Annotated[
    Annotated[DebianKernel, Tag("debian")]
    | Annotated[LocalKernel, Tag("local")]
    | Annotated[DockerKernel, Tag("docker")],
    Discriminator(
        kernel_kind,
        custom_error_type="kernel_entry",
        custom_error_message=(
            "a kernel entry is a mapping such as {name: '6.1', suite: bookworm, "
            "package: linux-image-cloud-amd64}"
        ),
    ),
]
#: A kernel that boots under QEMU.
QemuKernel = DebianKernel | LocalKernel
