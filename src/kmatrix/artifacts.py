"""Digests of cached artifacts, recorded when they are made and checked before each use.

A cache entry that was edited, truncated or half-written must never be used as if it were
the verified thing it once was: a truncated userland would boot and be reported as a
kernel panic, an edited module would be measured. Trees (an unpacked kernel, the guest
userland) carry a manifest of every file's SHA256; single files (the userland archive and
tarball) a ``.sha256`` file beside them. Anything that does not match is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from kmatrix.errors import CacheCorrupted as CacheCorrupted
from kmatrix.results.schema import atomic_write_text

MANIFEST = ".kmatrix-manifest.json"
#: Files in a tree that are bookkeeping, not content.
_IGNORED = {MANIFEST, ".complete"}


def sha256_of(path: Path) -> str:
    """Hex SHA256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """Relative path -> SHA256 (files) or ``link:TARGET`` (symlinks) for a whole tree."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        # os.walk lists symlinks to directories among dirnames and does not follow them.
        for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
            path = base / name
            rel = str(path.relative_to(root))
            if rel in _IGNORED:
                continue
            out[rel] = f"link:{os.readlink(path)}" if path.is_symlink() else sha256_of(path)
    return out


def write_manifest(root: Path) -> None:
    """Record every file of ``root`` (call once the tree is complete)."""
    atomic_write_text(root / MANIFEST, json.dumps({"files": tree_digests(root)}, sort_keys=True))


def tree_problem(root: Path) -> str | None:
    """None when ``root`` is exactly what its manifest recorded, else what differs."""
    try:
        recorded = json.loads((root / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{root} has no valid {MANIFEST}"
    if not isinstance(recorded, dict):
        return f"{root}/{MANIFEST} is damaged"
    actual = tree_digests(root)
    for rel in sorted(set(recorded) | set(actual)):
        if recorded.get(rel) != actual.get(rel):
            change = "changed" if rel in actual and rel in recorded else "missing or added"
            return f"{root / rel} was {change} after it was cached"
    return None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_file_digest(path: Path) -> str:
    """Record ``path``'s SHA256 beside it; returns the digest."""
    digest = sha256_of(path)
    atomic_write_text(_sidecar(path), digest + "\n")
    return digest


def file_digest(path: Path) -> str | None:
    """``path``'s recorded SHA256 when the file still matches it, else None."""
    try:
        recorded = _sidecar(path).read_text().strip()
        return recorded if sha256_of(path) == recorded else None
    except OSError:
        return None


def image_content_hash(
    origin: tuple[str, str],
    dockerfile: bytes,
    files: tuple[str, Mapping[str, bytes]],
    digests: tuple[str, Mapping[str, str]] | None = None,
) -> str:
    """16 hex digits over every input of a Docker image (pure), for its content-hash tag.

    ``origin`` is (kind, value) of what the image starts from (the userland key, a base
    image id); ``files`` (kind, name -> content) what is copied in; ``digests`` (kind, name
    -> hex SHA256) inputs known by their digest. The tag changes exactly when one does.
    """
    kind, value = origin
    h = hashlib.sha256()
    h.update(kind.encode() + b"\0" + value.encode() + b"\0")
    h.update(b"dockerfile\0" + hashlib.sha256(dockerfile).digest())
    kind, named = files
    for name, data in sorted(named.items()):
        h.update(kind.encode() + b"\0" + name.encode() + b"\0" + hashlib.sha256(data).digest())
    kind, known = digests or ("", {})
    for name, digest in sorted(known.items()):
        h.update(kind.encode() + b"\0" + name.encode() + b"\0" + digest.encode())
    return h.hexdigest()[:16]
