"""Tests of kmatrix.debian.archive: parsers, kernel resolution, extraction, the verification chain.

The chain tests build a tiny signed archive in tmp_path with a throwaway GPG key and serve it
through a file:// mirror; only the test marked ``qemu`` talks to the real mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from kmatrix.debian import download as fetching
from kmatrix.debian import sources as apt_sources
from kmatrix.debian.archive import (
    Archive,
    Dependency,
    PackageRecord,
    SourceEntry,
    SuiteIndex,
    compare_versions,
    default_cache_dir,
    extract_deb,
    gpgv_verify,
    mirror_from_apt_sources,
    parse_deb822,
    parse_deb822_sources,
    parse_depends,
    parse_gpgv_status,
    parse_one_line_sources,
    parse_packages,
    parse_release,
    pick_main_mirror,
    resolve_kernel,
    resolve_mirror,
)
from kmatrix.errors import InfraError, UserError, VerificationError
from localarchive import write_pool

FIXTURES = Path(__file__).parent / "fixtures" / "debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


# ------------------------------------------------------------------------------------------
# Version comparison
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "sign"),
    [
        ("7.3~rc7-1~exp1", "7.3-1", -1),
        ("7.3~rc7-1~exp1", "7.3~rc7-1", -1),
        ("7.3~rc6-1~exp1", "7.3~rc7-1~exp1", -1),
        ("1.0~", "1.0", -1),
        ("1.0~~", "1.0~", -1),
        ("1.0", "1.0a", -1),
        ("1.0a", "1.0+", -1),  # letters sort before other symbols
        ("1.0", "1.0+b1", -1),
        ("6.1.170-3", "6.1.176-1", -1),
        ("7.2.9-1", "7.2.13-1", -1),
        ("2.0", "1:0.1", -1),  # epoch wins
        ("1.0-1", "1.0-01", 0),
        ("1.0", "1.0-0", 0),
        ("0:1.2", "1.2", 0),
        ("6.12.117-1", "6.12.117-1", 0),
        ("1.2.3-1", "1.2.3-1.1", -1),
        ("1.2.3-1", "1.2.3-1+deb12u1", -1),
        ("5.10.223-1", "5.10.223-1~bpo10+1", 1),
    ],
)
def test_compare_versions(a: str, b: str, sign: int) -> None:
    def sgn(x: int) -> int:
        return (x > 0) - (x < 0)

    assert sgn(compare_versions(a, b)) == sign
    assert sgn(compare_versions(b, a)) == -sign


def test_compare_versions_matches_dpkg() -> None:
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg not installed")
    pairs = [("7.3~rc7-1~exp1", "7.3-1"), ("1.0+b1", "1.0~b1"), ("2:1", "1:9"), ("1a", "1.")]
    for a, b in pairs:
        lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode
        assert (compare_versions(a, b) < 0) == (lt == 0), (a, b)


# ------------------------------------------------------------------------------------------
# deb822, Release, Packages, Depends
# ------------------------------------------------------------------------------------------


def test_parse_deb822_continuations_and_comments() -> None:
    text = "# comment\nPackage: a\nDescription: short\n long line\n .\n more\n\n\nPackage: b\n"
    stanzas = parse_deb822(text)
    assert stanzas == [
        {"Package": "a", "Description": "short\nlong line\n.\nmore"},
        {"Package": "b"},
    ]


def test_parse_deb822_rejects_garbage() -> None:
    with pytest.raises(ValueError, match=r"x\.txt:2"):
        parse_deb822("Package: a\nthis is not a field\n", "x.txt")
    with pytest.raises(ValueError, match="continuation"):
        parse_deb822(" starts indented\n", "y")


def test_parse_packages_real_stanzas() -> None:
    pkgs = parse_packages((FIXTURES / "sid-kernel.Packages").read_text(), "sid")
    rec = pkgs["linux-binary-7.2.13+deb14-cloud-amd64"][0]
    assert rec.version == "7.2.13-1"
    assert rec.source == "linux-signed-amd64 (7.2.13+1)"
    assert rec.filename.startswith("pool/main/l/linux-signed-amd64/linux-binary-7.2.13")
    assert len(rec.sha256) == 64 and rec.size > 1_000_000
    base = pkgs["linux-base-7.2.13+deb14-cloud-amd64"][0]
    assert base.source == "linux" and base.depends == ""


def test_parse_packages_missing_field() -> None:
    with pytest.raises(ValueError, match="lacks"):
        parse_packages("Package: x\nVersion: 1\n", "sid")


def test_parse_depends() -> None:
    deps = parse_depends(
        "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
        "linux-base-7.3-cloud-amd64 (= 7.3~rc7-1~exp1), kmod:any, foo [amd64] <!nocheck>"
    )
    assert deps == [
        [
            Dependency("dracut"),
            Dependency("initramfs-tools", ">=", "0.120+deb8u2"),
            Dependency("linux-initramfs-tool"),
        ],
        [Dependency("linux-base-7.3-cloud-amd64", "=", "7.3~rc7-1~exp1")],
        [Dependency("kmod")],
        [Dependency("foo")],
    ]
    assert parse_depends("") == []


# ------------------------------------------------------------------------------------------
# Real InRelease and gpgv
# ------------------------------------------------------------------------------------------


def test_real_bullseye_inrelease_verifies(tmp_path: Path) -> None:
    text, fingerprints = gpgv_verify(FIXTURES / "bullseye-InRelease", DEBIAN_KEYRING)
    assert fingerprints, "expected at least one VALIDSIG"
    rel = parse_release(text)
    assert (rel.suite, rel.codename) == ("oldoldstable", "bullseye")
    assert rel.valid_until is None
    assert rel.sha256["main/binary-amd64/Packages.xz"] == (
        "1c3405444297ead864711c18e64bce4810db63b48340a2f9d81182d9f235ad71",
        8065948,
    )
    assert "-----BEGIN PGP" not in text


def test_real_bullseye_inrelease_byte_flip_fails(tmp_path: Path) -> None:
    data = bytearray((FIXTURES / "bullseye-InRelease").read_bytes())
    pos = data.index(b"Codename: bullseye") + len("Codename: ")
    data[pos] = ord("B")
    bad = tmp_path / "InRelease"
    bad.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="no good signature"):
        gpgv_verify(bad, DEBIAN_KEYRING)


def test_gpgv_missing_keyring_or_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InfraError, match="apt-get install gpgv debian-archive-keyring"):
        gpgv_verify(FIXTURES / "bullseye-InRelease", tmp_path / "nope.gpg")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InfraError, match=r"gpgv is not installed.*apt-get install gpgv"):
        gpgv_verify(FIXTURES / "bullseye-InRelease", DEBIAN_KEYRING)


def test_parse_gpgv_status() -> None:
    status = (
        "[GNUPG:] NEWSIG\n"
        "[GNUPG:] GOODSIG 0E98404D386FA1D9 Debian Archive\n"
        "[GNUPG:] VALIDSIG A7236886F3CCCAAD148A27F80E98404D386FA1D9 2025-08-09 1 0 4 0 1 8 01 X\n"
        "[GNUPG:] ERRSIG 1234 1 8 01 1754731018 9 -\n"
        "[GNUPG:] NO_PUBKEY 1234\n"
        "gpgv: noise\n"
    )
    valid, problems = parse_gpgv_status(status)
    assert valid == ["A7236886F3CCCAAD148A27F80E98404D386FA1D9"]
    assert problems == ["ERRSIG 1234", "NO_PUBKEY 1234"]


# ------------------------------------------------------------------------------------------
# apt sources and mirror choice
# ------------------------------------------------------------------------------------------

DEB822_SOURCES = """\
Types: deb
# a comment inside a stanza
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_parse_deb822_sources() -> None:
    entries = parse_deb822_sources(DEB822_SOURCES)
    assert entries[0] == SourceEntry(
        "deb", "http://mirror.example/debian/", ("bookworm", "bookworm-updates")
    )
    assert pick_main_mirror(entries) == "http://mirror.example/debian"
    disabled = "Enabled: no\n" + DEB822_SOURCES
    assert pick_main_mirror(parse_deb822_sources(disabled)) is None


def test_parse_one_line_sources() -> None:
    text = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/x.gpg] http://one.example/debian/ bookworm main contrib\n"
    )
    entries = parse_one_line_sources(text)
    assert SourceEntry("deb", "http://one.example/debian/", ("bookworm",)) in entries
    assert pick_main_mirror(entries) == "http://one.example/debian"


def test_pick_main_mirror_prefers_plain_suite_over_updates() -> None:
    entries = [
        SourceEntry("deb", "http://updates.example/debian", ("bookworm-updates",)),
        SourceEntry("deb", "http://sec.example/debian-security", ("bookworm-security",)),
        SourceEntry("deb", "http://main.example/debian", ("bookworm",)),
    ]
    assert pick_main_mirror(entries) == "http://main.example/debian"
    assert pick_main_mirror(entries[:2]) == "http://updates.example/debian"
    assert pick_main_mirror(entries[1:2]) is None
    old_security = [SourceEntry("deb", "http://s.example/debian-security", ("buster/updates",))]
    assert pick_main_mirror(old_security) is None


def test_mirror_from_apt_sources_files(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a.list.disabled-by-admin").write_text("deb http://disabled.example/debian sid main\n")
    (d / "b.sources").write_text(DEB822_SOURCES)
    (d / "c.list").write_text("deb http://later.example/debian trixie main\n")
    missing = tmp_path / "sources.list"
    assert mirror_from_apt_sources([missing, d]) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb http://first.example/debian/ bullseye main\n")
    assert mirror_from_apt_sources([missing, d]) == "http://first.example/debian"


def test_mirror_from_apt_sources_none(tmp_path: Path) -> None:
    (tmp_path / "x.list").write_text("deb-src http://src.example/debian sid main\n")
    with pytest.raises(UserError, match=r"mirror:.*KMATRIX_MIRROR"):
        mirror_from_apt_sources([tmp_path])


def test_resolve_mirror_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMATRIX_MIRROR", "http://env.example/debian/")
    assert resolve_mirror("http://cfg.example/debian") == "http://env.example/debian"
    monkeypatch.delenv("KMATRIX_MIRROR")
    assert resolve_mirror("http://cfg.example/debian/") == "http://cfg.example/debian"
    monkeypatch.setattr(apt_sources, "mirror_from_apt_sources", lambda: "http://apt.example/debian")
    assert resolve_mirror(None) == "http://apt.example/debian"
    assert resolve_mirror("  ") == "http://apt.example/debian"


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMATRIX_CACHE", str(tmp_path / "k"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "k"
    monkeypatch.delenv("KMATRIX_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "kmatrix"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "kmatrix"


# ------------------------------------------------------------------------------------------
# SuiteIndex and resolve_kernel on real stanzas
# ------------------------------------------------------------------------------------------


def fixture_index(suite: str) -> SuiteIndex:
    text = (FIXTURES / f"{suite}-kernel.Packages").read_text()
    return SuiteIndex(suite, suite, "", None, parse_packages(text, suite))


def names(recs: list[PackageRecord]) -> list[str]:
    return [r.name for r in recs]


def test_resolve_kernel_bookworm_style() -> None:
    k = resolve_kernel(fixture_index("bookworm"), "linux-image-cloud-amd64")
    assert k.primary.name == "linux-image-6.1.0-50-cloud-amd64"
    assert k.primary.version == "6.1.176-1"
    # Plain linux-base (an unrelated package) is not followed.
    assert names(k.records) == ["linux-image-6.1.0-50-cloud-amd64", "linux-image-cloud-amd64"]


def test_resolve_kernel_sid_split() -> None:
    k = resolve_kernel(fixture_index("sid"), "linux-image-cloud-amd64")
    assert k.primary.name == "linux-binary-7.2.13+deb14-cloud-amd64"
    assert k.records[0] == k.primary
    assert sorted(names(k.records)) == [
        "linux-base-7.2.13+deb14-cloud-amd64",
        "linux-base-cloud-amd64",
        "linux-binary-7.2.13+deb14-cloud-amd64",
        "linux-image-7.2.13+deb14-cloud-amd64",
        "linux-image-cloud-amd64",
        "linux-modules-7.2.13+deb14-cloud-amd64",
    ]
    assert len(set(names(k.records))) == len(k.records)
    assert all(r.version == "7.2.13-1" for r in k.records)
    # Flavour metapackages are followed, recorded, but never downloaded (docs only).
    assert sorted(names(k.payload())) == [
        "linux-base-7.2.13+deb14-cloud-amd64",
        "linux-binary-7.2.13+deb14-cloud-amd64",
        "linux-image-7.2.13+deb14-cloud-amd64",
        "linux-modules-7.2.13+deb14-cloud-amd64",
    ]


def test_the_metapackage_is_not_downloaded() -> None:
    k = resolve_kernel(fixture_index("bookworm"), "linux-image-cloud-amd64")
    assert names(k.payload()) == ["linux-image-6.1.0-50-cloud-amd64"]


def test_resolve_kernel_experimental_by_versioned_name() -> None:
    idx = fixture_index("experimental")
    k = resolve_kernel(idx, "linux-image-7.3-cloud-amd64", "7.3~rc7-1~exp1")
    assert k.primary.name == "linux-binary-7.3-cloud-amd64"
    assert sorted(names(k.records)) == [
        "linux-base-7.3-cloud-amd64",
        "linux-binary-7.3-cloud-amd64",
        "linux-image-7.3-cloud-amd64",
        "linux-modules-7.3-cloud-amd64",
    ]
    meta = resolve_kernel(idx, "linux-image-cloud-amd64")
    assert "linux-modules-cloud-amd64" in names(meta.records)
    assert not any("unsigned" in n or n.endswith("-dbg") for n in names(meta.records))


def test_resolve_kernel_pinned_version_gone() -> None:
    idx = fixture_index("sid")
    with pytest.raises(UserError) as e:
        resolve_kernel(idx, "linux-image-cloud-amd64", "7.1.1-1")
    msg = str(e.value)
    assert "linux-image-cloud-amd64 version 7.1.1-1 is not in sid (it left the archive?)" in msg
    assert "available: 7.2.13-1" in msg


def test_resolve_kernel_not_a_kernel() -> None:
    with pytest.raises(UserError, match="does not lead to a kernel"):
        resolve_kernel(fixture_index("sid"), "linux-base-cloud-amd64")


def test_suite_index_get_newest_and_close_names() -> None:
    idx = fixture_index("bookworm")
    rec = PackageRecord("linux-image-cloud-amd64", "6.1.99-1", "f", "0" * 64, 1, "", "x", "b")
    idx.packages["linux-image-cloud-amd64"].append(rec)
    assert idx.get("linux-image-cloud-amd64").version == "6.1.176-1"
    assert idx.get("linux-image-cloud-amd64", "6.1.99-1") is rec
    with pytest.raises(UserError) as e:
        idx.get("linux-image-cloud-amd6")
    assert "suite bookworm" in str(e.value)
    assert "linux-image-cloud-amd64" in str(e.value)
    assert "linux-base" in idx.names()


# ------------------------------------------------------------------------------------------
# .deb construction and extraction
# ------------------------------------------------------------------------------------------


def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                info.mode = 0o755 if e[0].endswith(".sh") else 0o644
                tf.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755
    return info


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "xz":
        return lzma.compress(data)
    if compression == "gz":
        return gzip.compress(data)
    if compression == "zst":
        return bytes(zstandard.ZstdCompressor().compress(data))
    return data


def make_deb(
    files: dict[str, bytes] | None = None,
    compression: str = "xz",
    extra: list[tarfile.TarInfo] | None = None,
) -> bytes:
    """A minimal .deb: debian-binary, control.tar.xz and data.tar.<compression>."""
    files = files if files is not None else {"./boot/vmlinuz-1.0-test": b"kernel"}
    entries: list[tarfile.TarInfo | tuple[str, bytes]] = [_info("./", tarfile.DIRTYPE)]
    entries += [(k, v) for k, v in files.items()] + list(extra or [])
    data = _tar(entries)
    packed = _compress(data, compression)
    name = "data.tar" + (f".{compression}" if compression else "")
    control = lzma.compress(_tar([("./control", b"Package: test\n")]))
    return _ar([("debian-binary", b"2.0\n"), ("control.tar.xz", control), (name, packed)])


@pytest.mark.parametrize("compression", ["xz", "gz", "zst", ""])
def test_extract_deb_compressions(tmp_path: Path, compression: str) -> None:
    deb = tmp_path / "t.deb"
    deb.write_bytes(
        make_deb({"./usr/lib/modules/1/a.ko": b"x", "./bin/run.sh": b"#!"}, compression)
    )
    extract_deb(deb, tmp_path / "out")
    assert (tmp_path / "out/usr/lib/modules/1/a.ko").read_bytes() == b"x"
    assert os.access(tmp_path / "out/bin/run.sh", os.X_OK)
    assert not (tmp_path / "out/control").exists()


def test_extract_deb_symlinks_hardlinks_devices(tmp_path: Path) -> None:
    extra = [
        _info("./lib/modules/1/build", tarfile.SYMTYPE, "/usr/src/linux-headers-1"),
        _info("./boot/vmlinuz", tarfile.SYMTYPE, "vmlinuz-1.0-test"),
        _info("./boot/hard", tarfile.LNKTYPE, "./boot/vmlinuz-1.0-test"),
        _info("./dev/null", tarfile.CHRTYPE),
        _info("./dev/fifo", tarfile.FIFOTYPE),
    ]
    deb = tmp_path / "t.deb"
    deb.write_bytes(make_deb(extra=extra))
    out = tmp_path / "out"
    extract_deb(deb, out)
    assert os.readlink(out / "lib/modules/1/build") == "/usr/src/linux-headers-1"
    assert (out / "boot/vmlinuz").read_bytes() == b"kernel"
    assert (out / "boot/hard").read_bytes() == b"kernel"
    assert not (out / "dev/null").exists() and not (out / "dev/fifo").exists()
    # Extracting twice (e.g. two packages sharing a directory) replaces files and links.
    extract_deb(deb, out)
    assert os.readlink(out / "boot/vmlinuz") == "vmlinuz-1.0-test"


@pytest.mark.parametrize("bad", ["../escape", "./a/../../escape", "/etc/passwd"])
def test_extract_deb_rejects_unsafe_paths(tmp_path: Path, bad: str) -> None:
    deb = tmp_path / "t.deb"
    deb.write_bytes(make_deb({bad: b"evil"}))
    with pytest.raises(InfraError, match="unsafe path"):
        extract_deb(deb, tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_extract_deb_rejects_writes_through_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    deb = tmp_path / "t.deb"
    link = _info("./etc", tarfile.SYMTYPE, str(outside))
    deb.write_bytes(make_deb({}, extra=[link]))
    deb2 = tmp_path / "t2.deb"
    deb2.write_bytes(make_deb({"./etc/passwd": b"evil"}))
    extract_deb(deb, tmp_path / "out")
    with pytest.raises(InfraError, match="outside"):
        extract_deb(deb2, tmp_path / "out")
    assert not (outside / "passwd").exists()


def test_extract_deb_not_a_deb(tmp_path: Path) -> None:
    deb = tmp_path / "t.deb"
    deb.write_bytes(b"hello")
    with pytest.raises(InfraError, match=r"not a \.deb"):
        extract_deb(deb, tmp_path / "out")


def test_extract_deb_matches_dpkg_deb(tmp_path: Path) -> None:
    """Our ar writer and reader agree with dpkg-deb on a package we build."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    deb = tmp_path / "t.deb"
    deb.write_bytes(make_deb({"./boot/vmlinuz-1.0-test": b"kernel", "./odd": b"123"}))
    listing = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(listing)) as tf:
        assert "./odd" in tf.getnames()


# ------------------------------------------------------------------------------------------
# A signed fake archive served over file://
# ------------------------------------------------------------------------------------------


@dataclass
class Signer:
    gnupghome: Path
    keyring: Path

    def clearsign(self, text: str, out: Path) -> None:
        src = out.with_suffix(".unsigned")
        src.write_text(text)
        subprocess.run(
            ["gpg", "--batch", "--yes", "--clearsign", "-o", str(out), str(src)],
            env={**os.environ, "GNUPGHOME": str(self.gnupghome)},
            check=True,
            capture_output=True,
            timeout=60,
        )
        src.unlink()


def _gen_key(home: Path) -> None:
    home.mkdir(mode=0o700)
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--pinentry-mode", "loopback",
         "--quick-gen-key", "kmatrix test <test@example.invalid>", "ed25519", "sign", "never"],
        env={**os.environ, "GNUPGHOME": str(home)}, check=True, capture_output=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="session")
def signers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Signer, Signer]]:
    """A trusted test key and an untrusted one (whose signatures must be rejected)."""
    base = tmp_path_factory.mktemp("gpg")
    out: list[Signer] = []
    for name in ("trusted", "other"):
        home = base / name
        _gen_key(home)
        keyring = base / f"{name}.gpg"
        exported = subprocess.run(
            ["gpg", "--export"], env={**os.environ, "GNUPGHOME": str(home)},
            check=True, capture_output=True, timeout=60,
        ).stdout  # fmt: skip
        keyring.write_bytes(exported)
        out.append(Signer(home, keyring))
    yield out[0], out[1]
    for s in out:
        subprocess.run(
            ["gpgconf", "--kill", "gpg-agent"],
            env={**os.environ, "GNUPGHOME": str(s.gnupghome)},
            check=False, capture_output=True, timeout=30,
        )  # fmt: skip


@dataclass
class FakePkg:
    name: str
    version: str
    depends: str = ""
    deb: bytes = field(default_factory=make_deb)

    @property
    def filename(self) -> str:
        return f"pool/main/{self.name[0]}/{self.name}/{self.name}_{self.version}_amd64.deb"


@dataclass
class FakeArchive:
    root: Path
    signer: Signer
    suite: str = "testing-suite"
    codename: str = "fakecodename"
    valid_until: str | None = "Fri, 01 Jan 2100 00:00:00 UTC"
    formats: tuple[str, ...] = ("xz", "gz")

    @property
    def url(self) -> str:
        return self.root.as_uri()

    @property
    def dists(self) -> Path:
        return self.root / "dists" / self.suite

    def publish(self, pkgs: list[FakePkg], signer: Signer | None = None) -> None:
        plain = write_pool(self.root, pkgs)
        binary = self.dists / "main" / "binary-amd64"
        binary.mkdir(parents=True, exist_ok=True)
        blobs = {"Packages": plain, "Packages.xz": lzma.compress(plain)}
        blobs["Packages.gz"] = gzip.compress(plain)
        sums = []
        for fname, blob in blobs.items():
            (binary / fname).write_bytes(blob)
            ext = fname.partition(".")[2]
            if ext in self.formats or (not ext and "" in self.formats):
                sha = hashlib.sha256(blob).hexdigest()
                sums.append(f" {sha} {len(blob):>8} main/binary-amd64/{fname}")
        release = (
            f"Suite: {self.suite}\nCodename: {self.codename}\n"
            "Date: Sat, 01 Jan 2000 00:00:00 UTC\n"
            + (f"Valid-Until: {self.valid_until}\n" if self.valid_until else "")
            + "Architectures: amd64\nComponents: main\nSHA256:\n"
            + "\n".join(sums)
            + "\n"
        )
        (signer or self.signer).clearsign(release, self.dists / "InRelease")


KERNEL_PKGS = [
    FakePkg("linux-image-cloud-amd64", "7.3~rc7-1~exp1",
            "linux-image-7.3-cloud-amd64 (= 7.3~rc7-1~exp1)"),
    FakePkg("linux-image-7.3-cloud-amd64", "7.3~rc7-1~exp1",
            "dracut | initramfs-tools, linux-binary-7.3-cloud-amd64 (= 7.3~rc7-1~exp1), "
            "linux-base (>= 4.17~)"),
    FakePkg("linux-binary-7.3-cloud-amd64", "7.3~rc7-1~exp1",
            deb=make_deb({"./usr/lib/modules/7.3-cloud-amd64/vmlinuz": b"bzImage"})),
    FakePkg("linux-base", "4.12"),
]  # fmt: skip


@pytest.fixture
def fake(tmp_path: Path, signers: tuple[Signer, Signer]) -> FakeArchive:
    archive = FakeArchive(tmp_path / "mirror", signers[0])
    archive.publish(KERNEL_PKGS)
    return archive


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KMATRIX_CHECK_VALID_UNTIL", "KMATRIX_INDEX_TTL", "KMATRIX_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(fetching, "BACKOFF_SECONDS", 0.0)


def make_archive(fake: FakeArchive, cache: Path, **kw: object) -> Archive:
    return Archive(fake.url, cache, keyring=fake.signer.keyring, **kw)  # type: ignore[arg-type]


def test_chain_good_path(fake: FakeArchive, tmp_path: Path) -> None:
    logs: list[str] = []
    archive = make_archive(fake, tmp_path / "cache", log=logs.append)
    idx = archive.index(fake.suite)
    assert archive.index(fake.suite) is idx
    assert (idx.suite, idx.codename, idx.valid_until) == (
        fake.suite, fake.codename, fake.valid_until,
    )  # fmt: skip
    assert any("Packages.xz" in m for m in logs)
    k = resolve_kernel(idx, "linux-image-cloud-amd64")
    assert k.primary.name == "linux-binary-7.3-cloud-amd64"
    paths = archive.fetch_all(k.records)
    assert paths[0] == tmp_path / "cache" / "debs" / f"{k.primary.sha256}.deb"
    out = tmp_path / "root"
    for p in paths:
        extract_deb(p, out)
    assert (out / "usr/lib/modules/7.3-cloud-amd64/vmlinuz").read_bytes() == b"bzImage"


def test_chain_second_run_downloads_nothing(fake: FakeArchive, tmp_path: Path) -> None:
    first = make_archive(fake, tmp_path / "cache")
    rec = first.index(fake.suite).get("linux-binary-7.3-cloud-amd64")
    first.fetch(rec)
    shutil.rmtree(fake.root)  # the mirror is gone: everything must come from the cache
    logs: list[str] = []
    second = make_archive(fake, tmp_path / "cache", log=logs.append)
    assert second.fetch(second.index(fake.suite).get(rec.name)).is_file()
    assert not any(m.startswith("downloading") for m in logs)


def test_chain_stale_inrelease_refetched(
    fake: FakeArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_archive(fake, tmp_path / "cache").index(fake.suite)
    monkeypatch.setenv("KMATRIX_INDEX_TTL", "0")
    logs: list[str] = []
    make_archive(fake, tmp_path / "cache", log=logs.append).index(fake.suite)
    assert any(m.endswith("/InRelease") for m in logs)
    # Packages is keyed by its hash and InRelease did not change: not downloaded again.
    assert not any("Packages" in m for m in logs)


def test_chain_packages_gz_fallback(fake: FakeArchive, tmp_path: Path) -> None:
    fake.formats = ("gz",)
    fake.publish(KERNEL_PKGS)
    logs: list[str] = []
    make_archive(fake, tmp_path / "cache", log=logs.append).index(fake.suite)
    assert any(m.endswith("Packages.gz") for m in logs)
    fake.formats = ("",)
    fake.publish(KERNEL_PKGS)
    make_archive(fake, tmp_path / "cache2").index(fake.suite)


def test_chain_tampered_packages(fake: FakeArchive, tmp_path: Path) -> None:
    xz = fake.dists / "main/binary-amd64/Packages.xz"
    xz.write_bytes(xz.read_bytes() + b"\0")
    with pytest.raises(VerificationError, match=r"Packages\.xz of suite testing-suite.*deleted"):
        make_archive(fake, tmp_path / "cache").index(fake.suite)
    assert list((tmp_path / "cache/indices/packages").iterdir()) == []


def test_chain_tampered_deb(fake: FakeArchive, tmp_path: Path) -> None:
    archive = make_archive(fake, tmp_path / "cache")
    rec = archive.index(fake.suite).get("linux-binary-7.3-cloud-amd64")
    (fake.root / rec.filename).write_bytes(make_deb({"./evil": b"x"}))
    with pytest.raises(VerificationError) as e:
        archive.fetch(rec)
    msg = str(e.value)
    assert "linux-binary-7.3-cloud-amd64 7.3~rc7-1~exp1" in msg and rec.sha256 in msg
    assert list((tmp_path / "cache/debs").iterdir()) == []


def test_chain_corrupted_cache_entry_refetched(fake: FakeArchive, tmp_path: Path) -> None:
    archive = make_archive(fake, tmp_path / "cache")
    rec = archive.index(fake.suite).get("linux-binary-7.3-cloud-amd64")
    path = archive.fetch(rec)
    path.write_bytes(b"corrupt")
    assert archive.fetch(rec) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec.sha256


def test_chain_bad_signature(fake: FakeArchive, tmp_path: Path) -> None:
    inrelease = fake.dists / "InRelease"
    inrelease.write_text(inrelease.read_text().replace("Codename: fake", "Codename: evil"))
    with pytest.raises(VerificationError) as e:
        make_archive(fake, tmp_path / "cache").index(fake.suite)
    assert "suite testing-suite" in str(e.value) and fake.url in str(e.value)
    assert not list((tmp_path / "cache/indices").rglob("InRelease*"))


def test_chain_untrusted_key(
    fake: FakeArchive, tmp_path: Path, signers: tuple[Signer, Signer]
) -> None:
    fake.publish(KERNEL_PKGS, signer=signers[1])
    with pytest.raises(VerificationError, match="signature"):
        make_archive(fake, tmp_path / "cache").index(fake.suite)


def test_chain_cached_inrelease_tampered_is_refetched(fake: FakeArchive, tmp_path: Path) -> None:
    archive = make_archive(fake, tmp_path / "cache")
    archive.index(fake.suite)
    (cached,) = (tmp_path / "cache/indices").rglob("InRelease")
    cached.write_text(cached.read_text().replace("Codename: fake", "Codename: evil"))
    idx = make_archive(fake, tmp_path / "cache").index(fake.suite)
    assert idx.codename == fake.codename


def test_chain_expired_valid_until(
    fake: FakeArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.valid_until = "Fri, 06 Nov 2026 08:08:01 UTC"
    fake.publish(KERNEL_PKGS)
    fake.valid_until = "Fri, 06 Nov 2020 08:08:01 UTC"
    fake.publish(KERNEL_PKGS)
    with pytest.raises(VerificationError) as e:
        make_archive(fake, tmp_path / "cache").index(fake.suite)
    msg = str(e.value)
    assert "testing-suite" in msg and "06 Nov 2020" in msg
    assert "check_valid_until: false" in msg and "KMATRIX_CHECK_VALID_UNTIL=0" in msg
    assert make_archive(fake, tmp_path / "c2", check_valid_until=False).index(fake.suite)
    monkeypatch.setenv("KMATRIX_CHECK_VALID_UNTIL", "0")
    assert make_archive(fake, tmp_path / "c3").index(fake.suite)


def test_chain_wrong_suite_served(fake: FakeArchive, tmp_path: Path) -> None:
    other = fake.root / "dists" / "othersuite"
    shutil.copytree(fake.dists, other)
    with pytest.raises(VerificationError, match="asked for suite othersuite"):
        make_archive(fake, tmp_path / "cache").index("othersuite")
    # The codename is as good as the suite name (sid vs unstable).
    shutil.copytree(fake.dists, fake.root / "dists" / fake.codename)
    assert make_archive(fake, tmp_path / "cache").index(fake.codename)


def test_chain_missing_suite_package_and_version(fake: FakeArchive, tmp_path: Path) -> None:
    archive = make_archive(fake, tmp_path / "cache")
    with pytest.raises(UserError, match="suite nosuchsuite does not exist on mirror"):
        archive.index("nosuchsuite")
    idx = archive.index(fake.suite)
    with pytest.raises(UserError) as e:
        idx.get("linux-image-cloud-amd65")
    assert "testing-suite" in str(e.value) and "linux-image-cloud-amd64" in str(e.value)
    with pytest.raises(UserError) as e:
        resolve_kernel(idx, "linux-image-cloud-amd64", "7.2.1-1")
    assert "version 7.2.1-1 is not in testing-suite" in str(e.value)
    assert "available: 7.3~rc7-1~exp1" in str(e.value)


def test_chain_missing_keyring(fake: FakeArchive, tmp_path: Path) -> None:
    archive = Archive(fake.url, tmp_path / "cache", keyring=tmp_path / "missing.gpg")
    with pytest.raises(InfraError, match="apt-get install gpgv debian-archive-keyring"):
        archive.index(fake.suite)


def test_download_retries_then_names_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def flaky(fail_times: int) -> Callable[[str, Path, float], None]:
        def fn(url: str, dest: Path, timeout: float) -> None:
            calls.append(url)
            if len(calls) <= fail_times:
                raise ConnectionResetError("reset by peer")
            dest.write_bytes(b"ok")

        return fn

    monkeypatch.setattr(fetching, "_download_once", flaky(2))
    fetching.download("http://h.example/x", tmp_path / "x", 1.0, lambda _m: None)
    assert (tmp_path / "x").read_bytes() == b"ok" and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(fetching, "_download_once", flaky(99))
    with pytest.raises(InfraError, match=r"http://h\.example/y after 4 attempts"):
        fetching.download("http://h.example/y", tmp_path / "y", 1.0, lambda _m: None)
    assert not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temp files left


# ------------------------------------------------------------------------------------------
# Live mirror (slow, network)
# ------------------------------------------------------------------------------------------


@pytest.mark.qemu
def test_live_mirror_resolves_cloud_kernels(tmp_path: Path) -> None:
    mirror = resolve_mirror(None)
    cache = Path(os.environ.get("KMATRIX_CACHE", tmp_path / "cache"))
    archive = Archive(mirror, cache, check_valid_until=False)
    t0 = time.monotonic()
    bookworm = resolve_kernel(archive.index("bookworm"), "linux-image-cloud-amd64")
    assert bookworm.primary.name.startswith("linux-image-6.1.0-")
    exp = resolve_kernel(archive.index("experimental"), "linux-image-cloud-amd64")
    assert exp.primary.name.startswith("linux-binary-")
    names_7x = names(exp.records)
    for part in ("linux-binary-", "linux-modules-", "linux-base-", "linux-image-"):
        assert any(n.startswith(part) and n[len(part)].isdigit() for n in names_7x), part
    assert exp.primary.version == exp.records[0].version
    assert time.monotonic() - t0 < 600
