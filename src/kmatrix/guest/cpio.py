"""A pure-Python writer (and reader, for tests) of the cpio "newc" format the kernel unpacks.

The kernel's initramfs unpacker (init/initramfs.c) accepts an uncompressed newc archive, so
no external cpio, fakeroot or root privileges are needed: ownership and modes are written
as we choose (everything root-owned), whatever the files on the host look like.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member as read back by :func:`read_cpio`."""

    name: str
    mode: int
    data: bytes

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        """True for a symbolic link (``data`` is the target)."""
        return stat.S_ISLNK(self.mode)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Write a newc archive member by member; parents are created implicitly, once."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._seen: set[str] = set()

    def _header(self, name: str, mode: int, size: int, nlink: int) -> None:
        encoded = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(encoded), 0]
        self._ino += 1
        self._out.write(_MAGIC + b"".join(b"%08X" % f for f in fields))
        self._out.write(encoded + _pad4(110 + len(encoded)))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.add_dir("/".join(parts[:i]))

    @staticmethod
    def _norm(name: str) -> str:
        name = name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad archive member name {name!r}")
        return name

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory (and its parents); adding one twice is a no-op."""
        name = self._norm(name)
        if name in self._seen:
            return
        self._parents(name)
        self._seen.add(name)
        self._header(name, stat.S_IFDIR | mode, 0, 2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with the given content and permission bits."""
        name = self._norm(name)
        if name in self._seen:
            raise ValueError(f"duplicate archive member {name!r}")
        self._parents(name)
        self._seen.add(name)
        self._header(name, stat.S_IFREG | mode, len(data), 1)
        self._out.write(data + _pad4(len(data)))

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symbolic link pointing at ``target``."""
        name = self._norm(name)
        if name in self._seen:
            return
        self._parents(name)
        self._seen.add(name)
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data), 1)
        self._out.write(data + _pad4(len(data)))

    def add_tree(self, root: Path, prefix: str = "") -> None:
        """Add every file, directory and symlink below ``root`` under ``prefix``, sorted."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for entry in [*dirnames, *sorted(filenames)]:
                path = Path(dirpath, entry)
                rel = os.path.normpath(os.path.join(prefix, rel_dir, entry))
                if path.is_symlink():
                    self.add_symlink(rel, os.readlink(path))
                elif path.is_dir():
                    self.add_dir(rel)
                elif path.is_file():
                    self.add_file(rel, path.read_bytes(), stat.S_IMODE(path.stat().st_mode))

    def finish(self) -> None:
        """Write the trailer; the archive is complete afterwards."""
        self._header(_TRAILER, 0, 0, 1)


def read_cpio(blob: bytes) -> Iterator[CpioEntry]:
    """Parse a newc archive (used by the tests to read back what the writer produced)."""
    pos = 0
    while True:
        if blob[pos : pos + 6] != _MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = blob[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == _TRAILER:
            return
        yield CpioEntry(name, mode, blob[data_start : data_start + size])
        pos = data_start + size + (-size % 4)
