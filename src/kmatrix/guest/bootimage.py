"""The file QEMU boots on x86: a bzImage's own vmlinux when it has a PVH entry point.

Under TCG a bzImage spends about a second decompressing itself before the kernel's clock
starts (measured, 6.12 amd64, QEMU 7.2: 2.96 s to a panic without root, 2.13 s booted as
vmlinux). QEMU boots an uncompressed ELF vmlinux directly when it carries the PVH entry
note (XEN_ELFNOTE_PHYS32_ENTRY, arch/x86/platform/pvh/head.S; Debian's amd64 kernels have
it), with the same -append and -initrd. The payload is found through the boot protocol
header (Documentation/arch/x86/boot.rst: setup_sects, payload_offset, payload_length).
Pure apart from :func:`boot_file`, which writes the file.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import lz4.block
import zstandard

from kmatrix.results.schema import atomic_write_bytes

#: ELF note of Xen's PVH entry point (include/xen/interface/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18
#: The legacy LZ4 frame the kernel's lz4 compression writes (lib/decompress_unlz4.c).
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_LEGACY_BLOCK = 8 << 20


def payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage (boot protocol >= 2.08), or None."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start : start + length] or None


def decompress(data: bytes) -> bytes | None:
    """The payload decompressed, for the formats Debian's kernels use; None for another
    format or a stream that is corrupt or ends early (the bzImage is booted then)."""
    try:
        return _decompress(data)
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError, lz4.block.LZ4BlockError):
        return None


def _decompress(data: bytes) -> bytes | None:
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        zstd = zstandard.ZstdDecompressor().decompressobj()
        out = zstd.decompress(data)
        return out if zstd.eof else None
    if data.startswith(b"\xfd7zXZ\x00"):
        xz = lzma.LZMADecompressor()
        out = xz.decompress(data)
        return out if xz.eof else None
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)  # raises on a truncated stream (EOFError)
    if data.startswith(_LZ4_LEGACY_MAGIC):
        return _unlz4_legacy(data)
    return None


def _unlz4_legacy(data: bytes) -> bytes:
    """Blocks of [size LE32][lz4 block], each at most 8 MiB decompressed, then the 4-byte
    decompressed size the kernel's build appends (scripts/Makefile.lib size_append): a
    stream that does not end exactly so is damaged or cut short."""
    out, pos = bytearray(), len(_LZ4_LEGACY_MAGIC)
    while len(data) - pos > 4:
        (size,) = struct.unpack_from("<I", data, pos)
        if size == 0 or pos + 4 + size > len(data):
            raise EOFError("LZ4 block beyond the end of the payload")
        out += lz4.block.decompress(
            data[pos + 4 : pos + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK
        )
        pos += 4 + size
    if len(data) - pos != 4 or struct.unpack_from("<I", data, pos)[0] != len(out):
        raise EOFError("LZ4 stream without the kernel's size trailer")
    return bytes(out)


def _program_headers(elf: bytes) -> list[tuple[int, int, int]]:
    """(p_type, p_offset, p_filesz) of a 64-bit little-endian ELF; [] for anything else."""
    if not elf.startswith(b"\x7fELF\x02\x01"):
        return []
    try:
        (phoff,) = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
        headers = [struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize) for i in range(phnum)]
    except struct.error:
        return []
    return [(h[0], h[2], h[5]) for h in headers]


def has_pvh_note(elf: bytes) -> bool:
    """True for a 64-bit little-endian ELF with a Xen PHYS32_ENTRY note in a PT_NOTE."""
    return any(
        kind == 4 and _notes_have(elf[offset : offset + size])
        for kind, offset, size in _program_headers(elf)
    )


def _notes_have(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + _align4(namesz) + _align4(descsz)
    return False


def _align4(n: int) -> int:
    return (n + 3) & ~3


def pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """The bzImage's vmlinux if it can be booted through PVH, else None."""
    packed = payload(bzimage)
    elf = decompress(packed) if packed else None
    return elf if elf and has_pvh_note(elf) and _segments_inside(elf) else None


def _segments_inside(elf: bytes) -> bool:
    """Every program header's file range lies within the file (not a truncated vmlinux)."""
    return all(offset + size <= len(elf) for _, offset, size in _program_headers(elf))


def boot_file(vmlinuz: Path, arch: str, dest: Path) -> tuple[Path, str]:
    """What QEMU boots and how: (``dest`` holding the vmlinux, "pvh") for an x86 bzImage
    with a PVH entry, else (``vmlinuz``, "bzimage" on x86 or "image" elsewhere)."""
    if arch != "amd64":
        return vmlinuz, "image"
    elf = pvh_vmlinux(vmlinuz.read_bytes())
    if elf is None:
        return vmlinuz, "bzimage"
    atomic_write_bytes(dest, elf)
    return dest, "pvh"
