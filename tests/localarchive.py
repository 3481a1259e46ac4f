"""A real, small Debian-format archive for tests: dpkg-deb packages, gpg-signed InRelease,
served by http.server on 127.0.0.1. Nothing here is mocked; only the key is throwaway."""

from __future__ import annotations

import hashlib
import http.server
import lzma
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Key:
    """A throwaway signing key: its GNUPGHOME and its exported (binary) public keyring."""

    home: Path
    keyring: Path

    def clearsign(self, text: str) -> str:
        """``text`` clearsigned with this key, as InRelease is."""
        return subprocess.run(
            ["gpg", "--batch", "--yes", "--clearsign"],
            input=text, env={**os.environ, "GNUPGHOME": str(self.home)},
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip

    def stop_agent(self) -> None:
        """Stop the gpg-agent the key's home started."""
        subprocess.run(
            ["gpgconf", "--kill", "gpg-agent"], env={**os.environ, "GNUPGHOME": str(self.home)},
            check=False, capture_output=True, timeout=30,
        )  # fmt: skip


def make_key(base: Path, name: str) -> Key:
    """Generate an ed25519 signing key under ``base/name`` and export its public keyring."""
    home = base / name
    home.mkdir(mode=0o700, parents=True)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--pinentry-mode", "loopback", "--quick-gen-key",
         f"kmatrix {name} <{name}@example.invalid>", "ed25519", "sign", "never"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    keyring = base / f"{name}.gpg"
    exported = subprocess.run(
        ["gpg", "--export"], env=env, check=True, capture_output=True, timeout=60
    ).stdout
    keyring.write_bytes(exported)
    return Key(home, keyring)


def build_deb(work: Path, name: str, version: str, files: dict[str, bytes],
              depends: str = "") -> bytes:  # fmt: skip
    """A real .deb built by dpkg-deb from ``files`` (paths relative to /)."""
    root = work / f"{name}_{version}"
    (root / "DEBIAN").mkdir(parents=True)
    control = (
        f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
        "Maintainer: kmatrix tests <tests@example.invalid>\n"
        + (f"Depends: {depends}\n" if depends else "")
        + "Description: kmatrix test package\n"
    )
    (root / "DEBIAN" / "control").write_text(control)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    out = work / f"{name}_{version}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out.read_bytes()


class _Deb(Protocol):
    name: str
    version: str
    depends: str
    filename: str
    deb: bytes


def write_pool(root: Path, pkgs: Sequence[_Deb]) -> bytes:
    """Put each .deb at its Filename under ``root``; the Packages text that lists them."""
    stanzas = []
    for p in pkgs:
        path = root / p.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(p.deb)
        stanzas.append(
            f"Package: {p.name}\nVersion: {p.version}\nArchitecture: amd64\n"
            + (f"Depends: {p.depends}\n" if p.depends else "")
            + f"Filename: {p.filename}\nSize: {len(p.deb)}\n"
            + f"SHA256: {hashlib.sha256(p.deb).hexdigest()}\n"
        )
    return "\n".join(stanzas).encode()


@dataclass
class Pkg:
    """One binary package of the test archive."""

    name: str
    version: str
    deb: bytes
    depends: str = ""

    @property
    def filename(self) -> str:
        return f"pool/main/{self.name[0]}/{self.name}/{self.name}_{self.version}_amd64.deb"


@dataclass
class LocalArchive:
    """A Debian-format archive under ``root``: ``publish`` writes one suite of it."""

    root: Path
    key: Key
    extra_release_fields: dict[str, str] = field(default_factory=dict)

    def publish(self, suite: str, components: dict[str, list[Pkg]], sign: bool = True) -> None:
        """Write pool/, dists/SUITE/COMPONENT/binary-amd64/Packages{,.xz} and InRelease."""
        dists = self.root / "dists" / suite
        sums = []
        for component, pkgs in components.items():
            plain = write_pool(self.root, pkgs)
            binary = dists / component / "binary-amd64"
            binary.mkdir(parents=True, exist_ok=True)
            for fname, blob in (("Packages", plain), ("Packages.xz", lzma.compress(plain))):
                (binary / fname).write_bytes(blob)
                sha = hashlib.sha256(blob).hexdigest()
                sums.append(f" {sha} {len(blob):>8} {component}/binary-amd64/{fname}")
        extra = "".join(f"{k}: {v}\n" for k, v in self.extra_release_fields.items())
        release = (
            f"Origin: kmatrix-test\nSuite: {suite}\nCodename: {suite}\n"
            "Date: Sat, 01 Jan 2000 00:00:00 UTC\n" + extra
            + f"Architectures: amd64\nComponents: {' '.join(components)}\nSHA256:\n"
            + "\n".join(sums) + "\n"
        )  # fmt: skip
        (dists / "Release").write_text(release)
        (dists / "InRelease").write_text(self.key.clearsign(release) if sign else release)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    root.mkdir(parents=True, exist_ok=True)

    def handler(*args: object, **kwargs: object) -> _Quiet:
        return _Quiet(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
