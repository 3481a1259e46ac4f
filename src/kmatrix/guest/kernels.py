"""Turning a matrix kernel entry into files QEMU can boot: vmlinuz, modules, config, provenance.

One preparation per kind of QEMU kernel: :func:`prepare_debian` downloads, verifies and
extracts a resolved package, :func:`prepare_local` hashes a local build. A run holds each
cell's kernel as a :class:`KernelSource` (:class:`DebianSource`, :class:`LocalSource`), so the
cell prepares it without asking which kind it is.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kmatrix.artifacts import sha256_of, tree_problem, write_manifest
from kmatrix.config import DebianKernel, LocalKernel
from kmatrix.debian.archive import Archive
from kmatrix.debian.debfile import extract_deb
from kmatrix.debian.packages import KernelPackages
from kmatrix.debian.suites import ResolvedKernel
from kmatrix.errors import InfraError, UserError

# The config values the results record (docs/architecture.md, "Kernels and guests").
RECORDED_CONFIG = (
    "CONFIG_MEMCG",
    "CONFIG_MEMCG_V1",
    "CONFIG_TRANSPARENT_HUGEPAGE",
    "CONFIG_SHMEM",
    "CONFIG_SWAP",
    "CONFIG_HUGETLBFS",
)

_CONFIG_RE = re.compile(r"^(CONFIG_\w+)=(.*)$|^# (CONFIG_\w+) is not set$")


@dataclass(frozen=True)
class PreparedKernel:
    """A kernel ready to boot, with everything the results need to say where it came from."""

    name: str
    vmlinuz: Path
    modules_dir: Path | None
    release: str | None
    config: dict[str, str]
    provenance: dict[str, Any] = field(default_factory=dict)
    cmdline: str = ""
    arch: str = "amd64"  # Debian architecture: picks the QEMU binary, board and userland


def parse_kconfig(text: str) -> dict[str, str]:
    """Parse a kernel .config; ``# CONFIG_X is not set`` becomes ``"n"``."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = _CONFIG_RE.match(line.strip())
        if m and m.group(1):
            values[m.group(1)] = m.group(2).strip('"')
        elif m and m.group(3):
            values[m.group(3)] = "n"
    return values


#: A recorded option the kernel's .config does not mention: it did not exist in that
#: version (CONFIG_MEMCG_V1 before 6.10, where v1 was simply part of CONFIG_MEMCG), which
#: is not the same as ``n`` (it existed and was turned off).
ABSENT = "absent"


def recorded_config(values: dict[str, str]) -> dict[str, str]:
    """The subset of config values recorded in results; options not in the file: ABSENT."""
    return {key: values.get(key, ABSENT) for key in RECORDED_CONFIG}


def _find_one(root: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
    return None


def locate_kernel_tree(root: Path) -> tuple[Path, Path | None, Path | None]:
    """Find vmlinuz, the modules dir and the config in an extracted package tree.

    Debian <= 6.x installs /boot/vmlinuz-R and /boot/config-R; the 7.x split packages
    install /usr/lib/modules/R/{vmlinuz,config} instead.
    """
    vmlinuz = _find_one(
        root, ("boot/vmlinuz-*", "usr/lib/modules/*/vmlinuz", "lib/modules/*/vmlinuz")
    )
    if vmlinuz is None:
        raise InfraError(f"no vmlinuz found in the extracted kernel packages under {root}")
    modules = _find_one(root, ("usr/lib/modules/*", "lib/modules/*"))
    config = _find_one(root, ("boot/config-*", "usr/lib/modules/*/config", "lib/modules/*/config"))
    return vmlinuz, modules, config


def _extract_packages(archive: Archive, pkgs: KernelPackages, dest: Path) -> None:
    debs = archive.fetch_all(pkgs.payload())
    # A private temporary name: two runs sharing the cache may extract the same kernel.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial."))
    for deb in debs:
        extract_deb(deb, tmp)
    write_manifest(tmp)
    (tmp / ".complete").touch()
    # Swap the new tree in, then delete the old one: never a moment without a tree.
    old = dest.with_name(tmp.name.replace(".partial.", ".old."))
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def prepare_debian(
    archive: Archive, kernel: DebianKernel, resolved: ResolvedKernel, cache: Path
) -> PreparedKernel:
    """Download, verify and extract a resolved Debian kernel (once; later runs reuse it).

    Each package is fetched from the archive whose signed index listed it.
    """
    pkgs = resolved.packages
    primary = pkgs.primary
    tree = cache / "kernels" / primary.sha256
    # Checked at every use against the digests recorded at extraction: rebuilt if edited.
    if tree_problem(tree) is not None:
        _extract_packages(archive, pkgs, tree)
    vmlinuz, modules, config_file = locate_kernel_tree(tree)
    config = parse_kconfig(config_file.read_text()) if config_file else {}
    return PreparedKernel(
        name=kernel.name,
        vmlinuz=vmlinuz,
        modules_dir=modules,
        release=modules.name if modules else None,
        config=recorded_config(config),
        provenance={
            "requested": kernel.package,
            "package": primary.name,
            "version": primary.version,
            "sha256": primary.sha256,
            "packages": {
                r.name: {"version": r.version, "sha256": r.sha256, "suite": r.suite}
                for r in pkgs.records
            },
        }
        | resolved.provenance(),
        cmdline=kernel.cmdline,
        arch=kernel.arch,
    )


def tree_sha256(root: Path) -> str:
    """A hash of a directory tree: every path, file content and symlink target.

    Symlinks are hashed as links, never followed: an installed modules tree's ``build`` and
    ``source`` links point into the whole source tree.
    """
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        rel = here.relative_to(root).as_posix()
        for name in sorted([*dirnames, *filenames]):
            path = here / name
            if path.is_symlink():
                h.update(f"L {rel}/{name} {os.readlink(path)}\n".encode())
            elif path.is_file():
                h.update(f"F {rel}/{name} {sha256_of(path)}\n".encode())
            else:
                h.update(f"D {rel}/{name}\n".encode())
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
    return h.hexdigest()


def _local_inputs(kernel: LocalKernel) -> tuple[Path, Path | None, Path | None]:
    """The bzImage, modules tree and .config of a local build, each checked to exist."""
    vmlinuz = kernel.path.expanduser()
    if not vmlinuz.is_file():
        raise UserError(
            f"kernels[{kernel.name}].path: {vmlinuz} is not a file; point it at a bzImage "
            "(arch/x86/boot/bzImage after `make`)"
        )
    modules = kernel.modules.expanduser() if kernel.modules else None
    if modules is not None and not modules.is_dir():
        raise UserError(
            f"kernels[{kernel.name}].modules: {modules} is not a directory; run `make "
            "modules_install INSTALL_MOD_PATH=DIR` and point it at DIR/lib/modules/RELEASE"
        )
    config = kernel.config.expanduser() if kernel.config else None
    if config is not None and not config.is_file():
        raise UserError(
            f"kernels[{kernel.name}].config: {config} is not a file; point it at the build's "
            ".config"
        )
    return vmlinuz, modules, config


def prepare_local(kernel: LocalKernel) -> PreparedKernel:
    """A local build: a bzImage/vmlinuz path, optional modules dir and .config.

    ``build_sha256`` covers all three, so a rebuilt module or a changed config is a new
    kernel to the result cache even when the bzImage stayed the same.
    """
    vmlinuz, modules, cfg = _local_inputs(kernel)
    config = recorded_config(parse_kconfig(cfg.read_text())) if cfg else {}
    image_sha = sha256_of(vmlinuz)
    modules_sha = tree_sha256(modules) if modules else None
    config_sha = sha256_of(cfg) if cfg else None
    build = hashlib.sha256(f"{image_sha}\n{modules_sha}\n{config_sha}".encode()).hexdigest()
    return PreparedKernel(
        name=kernel.name,
        vmlinuz=vmlinuz,
        modules_dir=modules,
        release=modules.name if modules else None,
        config=config,
        provenance={
            "package": None,
            "version": None,
            "path": str(vmlinuz),
            "sha256": image_sha,
            "modules": str(modules) if modules else None,
            "modules_sha256": modules_sha,
            "config_file": str(cfg) if cfg else None,
            "config_sha256": config_sha,
            "build_sha256": build,
        },
        cmdline=kernel.cmdline,
        arch=kernel.arch,
    )


class KernelSource(Protocol):
    """A QEMU cell's kernel before it is prepared; what preparing it takes is its own business."""

    def phase(self) -> str | None:
        """The progress phase while it is prepared (``fetch PACKAGE``), or None when quick."""
        ...

    def prepare(self) -> PreparedKernel:
        """The kernel ready to boot (downloaded, verified and extracted once, then reused)."""
        ...


@dataclass(frozen=True)
class DebianSource:
    """A Debian kernel resolved up front, fetched from ``archive`` into ``cache``."""

    kernel: DebianKernel
    resolved: ResolvedKernel
    archive: Archive
    cache: Path

    def phase(self) -> str | None:
        return f"fetch {self.resolved.primary.name}"

    def prepare(self) -> PreparedKernel:
        return prepare_debian(self.archive, self.kernel, self.resolved, self.cache)


@dataclass(frozen=True)
class LocalSource:
    """A local build: its files are hashed where they are."""

    kernel: LocalKernel

    def phase(self) -> str | None:
        return None

    def prepare(self) -> PreparedKernel:
        return prepare_local(self.kernel)
