"""kmatrix.guest.bootimage on Debian's real amd64 kernels: the vmlinux inside each bzImage.

Debian's 6.1 kernel is LZ4-compressed (the kernel's legacy LZ4 frame, lib/decompress_unlz4.c)
and 6.12's zstd; both carry Xen's PVH entry note (arch/x86/platform/pvh/head.S), which is what
lets QEMU boot the ELF directly.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kmatrix.config import parse_matrix
from kmatrix.debian.archive import default_cache_dir
from kmatrix.debian.suites import Resolver
from kmatrix.guest import bootimage
from kmatrix.guest.kernels import prepare_debian

pytestmark = pytest.mark.qemu  # downloads kernels

MATRIX = """
check_valid_until: false
kernels:
  - {name: "6.1", suite: bookworm, package: linux-image-cloud-amd64}
  - {name: "6.12", suite: trixie, package: linux-image-cloud-amd64}
"""


@pytest.fixture(scope="module")
def bzimages() -> dict[str, bytes]:
    matrix = parse_matrix(MATRIX)
    cache = default_cache_dir()
    resolver = Resolver(matrix, cache)
    archive = resolver.main_archive("amd64")
    return {
        k.name: prepare_debian(archive, k, resolver.resolve(k), cache).vmlinuz.read_bytes()
        for k in matrix.kernels
    }


@pytest.mark.parametrize(
    ("name", "magic"), [("6.1", b"\x02\x21\x4c\x18"), ("6.12", b"\x28\xb5\x2f\xfd")]
)
def test_debian_kernels_unpack_to_a_pvh_vmlinux(
    bzimages: dict[str, bytes], name: str, magic: bytes
) -> None:
    packed = bootimage.payload(bzimages[name])
    assert packed is not None and packed.startswith(magic)
    elf = bootimage.pvh_vmlinux(bzimages[name])
    assert elf is not None and elf.startswith(b"\x7fELF")
    assert len(elf) > 2 * len(bzimages[name])  # decompressed, whole


def test_an_elf_without_the_pvh_note_is_not_booted_as_pvh(bzimages: dict[str, bytes]) -> None:
    elf = bytearray(bootimage.decompress(bootimage.payload(bzimages["6.12"]) or b"") or b"")
    assert bootimage.has_pvh_note(bytes(elf))
    # Renumber every Xen PHYS32_ENTRY note (type 18) to another type: no PVH entry then.
    needle = struct.pack("<I", bootimage.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
    assert needle in elf
    while (i := elf.find(needle)) >= 0:
        elf[i : i + 4] = struct.pack("<I", 99)
    assert not bootimage.has_pvh_note(bytes(elf))


def test_not_a_bzimage(tmp_path: Path) -> None:
    assert bootimage.payload(b"\0" * 4096) is None
    assert bootimage.decompress(b"no known magic") is None
    plain = tmp_path / "Image"
    plain.write_bytes(b"\0" * 4096)
    assert bootimage.boot_file(plain, "amd64", tmp_path / "out") == (plain, "bzimage")
    assert bootimage.boot_file(plain, "arm64", tmp_path / "out") == (plain, "image")


def test_a_corrupt_or_truncated_payload_boots_as_a_bzimage(bzimages: dict[str, bytes]) -> None:
    """A stream that ends early or is damaged gives no vmlinux (never a half kernel)."""
    for name in ("6.1", "6.12"):
        packed = bootimage.payload(bzimages[name]) or b""
        assert bootimage.decompress(packed) is not None
        assert bootimage.decompress(packed[: len(packed) // 2]) is None, name
        damaged = packed[:64] + bytes(b ^ 0xFF for b in packed[64:4096]) + packed[4096:]
        assert bootimage.decompress(damaged) is None, name
