"""Picking the kernel modules a guest needs, in load order, from a kernel's own package.

Debian's kernel packages ship no modules.dep (depmod runs at install time), so load order
comes from each module's own ``depends=`` entry in its .modinfo section.
"""

from __future__ import annotations

import gzip
import lzma
import re
from dataclasses import dataclass
from pathlib import Path

import zstandard

from kmatrix.errors import InfraError

# What the guest needs: a virtio PCI transport, the virtio block driver and ext4.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "ext4")

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_DEPENDS_RE = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


@dataclass(frozen=True)
class Module:
    """One module to load: its canonical name and decompressed bytes."""

    name: str
    data: bytes


def _canon(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return _canon(name[: -len(suffix)])
    return _canon(name)


def decompress_module(path: Path) -> bytes:
    """The ELF bytes of a .ko, .ko.xz, .ko.zst or .ko.gz file (busybox insmod wants plain ELF)."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    return raw


def module_depends(elf: bytes) -> list[str]:
    """The ``depends=`` list recorded in a module's .modinfo section."""
    m = _DEPENDS_RE.search(elf)
    if not m or not m.group(1):
        return []
    return [_canon(d) for d in m.group(1).decode().split(",") if d]


def builtin_modules(modules_dir: Path) -> set[str]:
    """Names listed in modules.builtin: compiled into the kernel, nothing to load."""
    listing = modules_dir / "modules.builtin"
    if not listing.exists():
        return set()
    return {_module_name(Path(line.strip())) for line in listing.read_text().splitlines() if line}


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map module name -> file for every loadable module below ``modules_dir``."""
    found: dict[str, Path] = {}
    for path in sorted(modules_dir.rglob("*.ko*")):
        if path.name.endswith(_SUFFIXES):
            found.setdefault(_module_name(path), path)
    return found


def modules_to_load(modules_dir: Path, wanted: tuple[str, ...] = GUEST_MODULES) -> list[Module]:
    """The modules ``wanted`` needs that are not built in, dependencies first."""
    builtin = builtin_modules(modules_dir)
    available = index_modules(modules_dir)
    order: list[Module] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name in chain:
            raise InfraError(f"module dependency cycle {' -> '.join((*chain, name))}")
        path = available.get(name)
        if path is None:
            raise InfraError(
                f"module {name} is neither built into the kernel nor shipped in {modules_dir}; "
                "this kernel cannot run the disk-backed scenarios"
            )
        elf = decompress_module(path)
        for dep in module_depends(elf):
            visit(dep, (*chain, name))
        done.add(name)
        order.append(Module(name, elf))

    for name in wanted:
        visit(_canon(name), ())
    return order
