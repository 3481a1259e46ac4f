"""Reading a .deb without dpkg or root: its ar members and the data.tar.* inside."""

from __future__ import annotations

import io
import lzma
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from kmatrix.errors import InfraError

_CHUNK = 1 << 20


class _Bounded(io.RawIOBase):
    """A read-only view of ``size`` bytes of ``f`` starting at its current position."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._left)
        if n <= 0:
            return 0
        data = self._f.read(n)
        b[: len(data)] = data
        self._left -= len(data)
        return len(data)


def _ar_members(f: IO[bytes], deb: Path) -> Iterator[tuple[str, int]]:
    """Yield (name, size) for each ar member, leaving ``f`` at the member's data."""
    if f.read(8) != b"!<arch>\n":
        raise InfraError(f"{deb} is not a .deb (no ar header); delete it and fetch it again")
    while True:
        header = f.read(60)
        if not header:
            return
        if len(header) != 60 or header[58:60] != b"`\n":
            raise InfraError(f"{deb}: truncated ar header; delete it and fetch it again")
        name = header[0:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = f.tell()
        yield name, size
        # Members are 2-byte aligned.
        f.seek(start + size + (size & 1))


def _open_data_tar(stream: IO[bytes], member: str) -> tarfile.TarFile:
    if member.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(stream)
        return tarfile.open(fileobj=reader, mode="r|")
    # tarfile sniffs gzip, bzip2, xz and plain tar by their magic bytes.
    return tarfile.open(fileobj=stream, mode="r|*")


def _safe_target(dest: Path, name: str, deb: Path) -> Path | None:
    rel = name[2:] if name.startswith("./") else name
    rel = rel.rstrip("/")
    if not rel or rel == ".":
        return None
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts:
        raise InfraError(
            f"{deb} contains the unsafe path {name!r}; refusing to extract it. "
            "Report the package; do not use it"
        )
    target = dest.joinpath(*parts)
    # A symlink extracted earlier could redirect later members outside dest.
    parent = os.path.realpath(target.parent)
    root = os.path.realpath(dest)
    if parent != root and not parent.startswith(root + os.sep):
        raise InfraError(
            f"{deb}: member {name!r} would be written outside {dest} through a symlink; "
            "extract this package into an empty directory"
        )
    return target


def _clear(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()


def _extract_member(tf: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, deb: Path) -> None:
    if m.ischr() or m.isblk() or m.isfifo():
        return
    target = _safe_target(dest, m.name, deb)
    if target is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if m.isdir():
        if not target.is_dir():
            _clear(target)
            target.mkdir()
        os.chmod(target, (m.mode & 0o7777) | 0o700)
    elif m.issym():
        _clear(target)
        os.symlink(m.linkname, target)
    elif m.islnk():
        source = _safe_target(dest, m.linkname, deb)
        if source is None or not source.is_file():
            raise InfraError(f"{deb}: hard link {m.name!r} points to missing {m.linkname!r}")
        _clear(target)
        os.link(source, target)
    elif m.isfile():
        _clear(target)
        src = tf.extractfile(m)
        if src is None:
            raise InfraError(f"{deb}: cannot read member {m.name!r}; fetch the package again")
        with src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        os.chmod(target, m.mode & 0o7777 & ~0o6000)
        os.utime(target, (m.mtime, m.mtime))


def extract_deb(deb: Path, dest: Path) -> None:
    """Extract the data.tar.* of ``deb`` into ``dest`` (pure Python, no root).

    Symlinks are kept as they are, device nodes and FIFOs are skipped, setuid bits are
    dropped, and no member may land outside ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with open(deb, "rb") as f:
        for name, size in _ar_members(f, deb):
            if not name.startswith("data.tar"):
                continue
            try:
                with _open_data_tar(io.BufferedReader(_Bounded(f, size), _CHUNK), name) as tf:
                    for m in tf:
                        _extract_member(tf, m, dest, deb)
            except (tarfile.TarError, lzma.LZMAError, EOFError, OSError, KeyError) as e:
                if isinstance(e, InfraError):
                    raise
                raise InfraError(
                    f"{deb}: cannot extract {name}: {e}; delete the file to fetch it again"
                ) from e
            return
    raise InfraError(f"{deb} has no data.tar member; delete it and fetch it again")
