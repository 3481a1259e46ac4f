"""A verified Debian archive client that needs no root.

Chain of trust: ``dists/SUITE/InRelease`` is checked with ``gpgv`` against the Debian archive
keyring, the ``Packages`` index is checked against the SHA256 list in that InRelease, and each
``.deb`` is checked against its ``Packages`` record. Everything downloaded is cached under
``cache_dir`` and re-hashed before use.

Pure parsing helpers (versions, Release, Depends, gpgv status) are kept apart from the code
that touches the network, the disk or subprocesses; deb822 parsing lives in
kmatrix.debian.deb822 and mirror discovery in kmatrix.debian.sources.
"""

from __future__ import annotations

import dataclasses
import difflib
import email.utils
import gzip
import hashlib
import http.client
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from kmatrix.artifacts import sha256_of
from kmatrix.debian.deb822 import parse_deb822 as parse_deb822

# Re-exported: mirror discovery moved to kmatrix.debian.sources, deb822 to kmatrix.debian.deb822.
from kmatrix.debian.sources import DEFAULT_APT_SOURCES as DEFAULT_APT_SOURCES
from kmatrix.debian.sources import MIRROR_HINT
from kmatrix.debian.sources import SourceEntry as SourceEntry
from kmatrix.debian.sources import mirror_from_apt_sources as mirror_from_apt_sources
from kmatrix.debian.sources import parse_deb822_sources as parse_deb822_sources
from kmatrix.debian.sources import parse_one_line_sources as parse_one_line_sources
from kmatrix.debian.sources import pick_main_mirror as pick_main_mirror
from kmatrix.debian.sources import resolve_mirror as resolve_mirror
from kmatrix.errors import InfraError, UserError, VerificationError

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
KERNEL_PREFIXES = ("linux-image-", "linux-binary-", "linux-modules-", "linux-base-")
RETRIES = 3
BACKOFF_SECONDS = 1.0
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageRecord:
    """One binary package as listed in a verified Packages index."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int
    depends: str
    source: str
    suite: str
    # Base URL of the archive whose verified index listed it: where the .deb is fetched from.
    archive: str = ""


@dataclass
class SuiteIndex:
    """The verified Packages index of one suite/component/architecture."""

    suite: str
    codename: str
    date: str
    valid_until: str | None
    packages: dict[str, list[PackageRecord]] = field(default_factory=dict, repr=False)

    def get(self, name: str, version: str | None = None) -> PackageRecord:
        """Return package ``name`` at ``version``, or its newest version when none is given."""
        candidates = self.packages.get(name)
        if not candidates:
            close = difflib.get_close_matches(name, self.packages.keys(), n=5)
            hint = f"closest names: {', '.join(close)}" if close else "no similar names"
            raise UserError(
                f"package {name} is not in suite {self.suite} ({hint}); "
                "check the package name and suite in matrix.yaml"
            )
        if version is None:
            return max_version(candidates)
        for rec in candidates:
            if compare_versions(rec.version, version) == 0:
                return rec
        available = ", ".join(sorted((r.version for r in candidates), key=_VersionKey))
        raise UserError(
            f"{name} version {version} is not in {self.suite} (it left the archive?); "
            f"available: {available}. Pin an available version or drop the pin"
        )

    def names(self) -> list[str]:
        """All package names in the index, sorted."""
        return sorted(self.packages)


@dataclass(frozen=True)
class KernelPackages:
    """A resolved kernel: the package holding vmlinuz plus everything to extract with it."""

    primary: PackageRecord
    records: list[PackageRecord]

    def payload(self) -> list[PackageRecord]:
        """The records to download and extract: all but flavour metapackages.

        ``linux-image-cloud-amd64`` holds nothing but documentation and is only followed to
        its Depends; its version and SHA256 come from the signed index. Fetching it would
        make a cell depend on a file no kernel needs: on a security mirror the metapackage
        can be in the index yet missing from the pool (seen for bullseye-security 5.10.262-1).
        """
        return [r for r in self.records if r is self.primary or _names_a_version(r.name)]


@dataclass(frozen=True)
class Dependency:
    """One alternative of a Depends clause: ``name (op version)``."""

    name: str
    op: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class ReleaseInfo:
    """The fields of a Release/InRelease file that the client uses."""

    suite: str
    codename: str
    date: str
    valid_until: str | None
    acquire_by_hash: bool
    sha256: dict[str, tuple[str, int]]


# --------------------------------------------------------------------------------------------
# Debian version comparison (dpkg's verrevcmp)
# --------------------------------------------------------------------------------------------

_DIGITS = "0123456789"


def _order(c: str) -> int:
    # dpkg's sort weights: '~' sorts before everything, even the end of the string;
    # letters before other symbols.
    if c in _DIGITS:
        return 0
    if c.isascii() and c.isalpha():
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and a[i] not in _DIGITS) or (j < len(b) and b[j] not in _DIGITS):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i] in _DIGITS and j < len(b) and b[j] in _DIGITS:
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i] in _DIGITS:
            return 1
        if j < len(b) and b[j] in _DIGITS:
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, colon, rest = v.partition(":")
    if not colon:
        epoch, rest = "0", v
    upstream, hyphen, revision = rest.rpartition("-")
    if not hyphen:
        upstream, revision = rest, ""
    try:
        return int(epoch or "0"), upstream, revision
    except ValueError:
        raise ValueError(f"bad epoch in Debian version {v!r}") from None


def compare_versions(a: str, b: str) -> int:
    """Compare two Debian versions like ``dpkg --compare-versions``: <0, 0 or >0."""
    ea, ua, ra = _split_version(a.strip())
    eb, ub, rb = _split_version(b.strip())
    if ea != eb:
        return -1 if ea < eb else 1
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


class _VersionKey:
    """Sort key wrapper so ``sorted(..., key=_VersionKey)`` orders Debian versions."""

    __slots__ = ("v",)

    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _VersionKey) -> bool:
        return compare_versions(self.v, other.v) < 0


def max_version(records: Iterable[PackageRecord]) -> PackageRecord:
    """The record with the highest Debian version."""
    best: PackageRecord | None = None
    for rec in records:
        if best is None or compare_versions(rec.version, best.version) > 0:
            best = rec
    if best is None:
        raise ValueError("max_version() needs at least one record")
    return best


# --------------------------------------------------------------------------------------------
# Pure parsers
# --------------------------------------------------------------------------------------------


def parse_release(text: str, origin: str = "InRelease") -> ReleaseInfo:
    """Parse the signed text of an InRelease/Release file."""
    stanzas = parse_deb822(text, origin)
    if not stanzas:
        raise ValueError(f"{origin}: empty Release file")
    fields = stanzas[0]
    sums: dict[str, tuple[str, int]] = {}
    for line in fields.get("SHA256", "").split("\n"):
        parts = line.split()
        if len(parts) == 3:
            sums[parts[2]] = (parts[0].lower(), int(parts[1]))
    return ReleaseInfo(
        suite=fields.get("Suite", ""),
        codename=fields.get("Codename", ""),
        date=fields.get("Date", ""),
        valid_until=fields.get("Valid-Until"),
        acquire_by_hash=fields.get("Acquire-By-Hash", "").lower() == "yes",
        sha256=sums,
    )


def parse_packages(
    text: str, suite: str, origin: str = "Packages", archive: str = ""
) -> dict[str, list[PackageRecord]]:
    """Parse a Packages index into records grouped by package name (listed in ``archive``)."""
    out: dict[str, list[PackageRecord]] = {}
    for st in parse_deb822(text, origin):
        try:
            name = st["Package"]
            rec = PackageRecord(
                name=name,
                version=st["Version"],
                filename=st["Filename"],
                sha256=st["SHA256"].lower(),
                size=int(st["Size"]),
                depends=st.get("Depends", ""),
                source=st.get("Source", name),
                suite=suite,
                archive=archive,
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"{origin}: stanza {st.get('Package', '?')} lacks {e}") from None
        out.setdefault(name, []).append(rec)
    return out


_DEP_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9.+\-]*)(?::[A-Za-z0-9\-]+)?\s*"
    r"(?:\(\s*(?P<op><<|<=|=|>=|>>|<|>)\s*(?P<ver>[^)\s]+)\s*\))?"
)


def parse_depends(value: str) -> list[list[Dependency]]:
    """Parse a Depends field into clauses of alternatives (``a | b, c`` -> [[a, b], [c]])."""
    clauses: list[list[Dependency]] = []
    for clause in value.replace("\n", " ").split(","):
        alts: list[Dependency] = []
        for alt in clause.split("|"):
            m = _DEP_RE.match(alt)
            if m:
                alts.append(Dependency(m["name"], m["op"], m["ver"]))
        if alts:
            clauses.append(alts)
    return clauses


_CLEARSIGN_BEGIN = "-----BEGIN PGP SIGNED MESSAGE-----"


def parse_gpgv_status(status: str) -> tuple[list[str], list[str]]:
    """Return (fingerprints with a VALIDSIG, problem lines) from ``gpgv --status-fd`` output.

    A problem is BADSIG, ERRSIG, EXPKEYSIG, REVKEYSIG or NO_PUBKEY; a valid signature from a
    key in the keyring is enough as long as no signature is outright bad (BADSIG).
    """
    valid: list[str] = []
    problems: list[str] = []
    for line in status.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "[GNUPG:]":
            continue
        if parts[1] == "VALIDSIG":
            valid.append(parts[2])
        elif parts[1] in ("BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG", "NO_PUBKEY"):
            problems.append(" ".join(parts[1:3]))
    return valid, problems


def is_kernel_part(name: str) -> bool:
    """Whether resolve_kernel follows Depends into ``name``."""
    return (
        name.startswith(KERNEL_PREFIXES) and not name.endswith("-dbg") and "-unsigned" not in name
    )


def _names_a_version(name: str) -> bool:
    """A kernel part with its ABI in the name (linux-image-6.1.0-50-..., linux-modules-7.3-...)."""
    prefixes = ("linux-image-", "linux-binary-", "linux-modules-", "linux-base-")
    return any(_is_versioned(name, p) for p in prefixes) or not name.startswith("linux-")


def _is_versioned(name: str, prefix: str) -> bool:
    # 'linux-image-6.1.0-50-cloud-amd64' is versioned, 'linux-image-cloud-amd64' is a
    # metapackage; the ABI right after the prefix always starts with a digit.
    return name.startswith(prefix) and name[len(prefix) : len(prefix) + 1].isdigit()


# --------------------------------------------------------------------------------------------
# Kernel resolution
# --------------------------------------------------------------------------------------------


def _choose_alternative(index: SuiteIndex, alts: list[Dependency]) -> Dependency | None:
    matching = [a for a in alts if is_kernel_part(a.name)]
    for alt in matching:
        if alt.name in index.packages:
            return alt
    # None exists: return the first anyway so index.get() raises a message naming it.
    return matching[0] if matching else None


def resolve_kernel(index: SuiteIndex, package: str, version: str | None = None) -> KernelPackages:
    """Follow ``package``'s Depends to every kernel part (image, binary, modules, base).

    ``version`` pins the package the user named; ``(= V)`` pins in Depends are honoured.
    """
    root = index.get(package, version)
    seen: dict[str, PackageRecord] = {root.name: root}
    stack = [root]
    while stack:
        rec = stack.pop(0)
        for alts in parse_depends(rec.depends):
            dep = _choose_alternative(index, alts)
            if dep is None or dep.name in seen:
                continue
            try:
                child = index.get(dep.name, dep.version if dep.op == "=" else None)
            except UserError as e:
                raise UserError(
                    f"{rec.name} {rec.version} in {index.suite} depends on {dep.name}, "
                    f"which cannot be resolved: {e}"
                ) from None
            seen[child.name] = child
            stack.append(child)
    records = list(seen.values())
    primary = next((r for r in records if _is_versioned(r.name, "linux-binary-")), None)
    primary = primary or next((r for r in records if _is_versioned(r.name, "linux-image-")), None)
    if primary is None:
        raise UserError(
            f"{package} in {index.suite} does not lead to a kernel: no versioned "
            "linux-image-* or linux-binary-* package among its Depends; name a kernel "
            "package such as linux-image-cloud-amd64"
        )
    return KernelPackages(primary=primary, records=[primary] + [r for r in records if r != primary])


# --------------------------------------------------------------------------------------------
# .deb extraction
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$KMATRIX_CACHE, else $XDG_CACHE_HOME/kmatrix, else ~/.cache/kmatrix."""
    if os.environ.get("KMATRIX_CACHE"):
        return Path(os.environ["KMATRIX_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kmatrix"
    return Path.home() / ".cache" / "kmatrix"


# --------------------------------------------------------------------------------------------
# Process and network I/O
# --------------------------------------------------------------------------------------------


class _NotFound(Exception):
    """The URL does not exist (HTTP 404/410 or a missing file:// path)."""


class SuiteNotFound(UserError):
    """The archive answered, but has no such suite (its InRelease is not there)."""


def _download_once(url: str, dest: Path, timeout: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "kmatrix"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, _CHUNK)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise _NotFound(url) from e
        raise
    except urllib.error.URLError as e:
        if isinstance(e.reason, FileNotFoundError):
            raise _NotFound(url) from e
        raise


def download(
    url: str, dest: Path, timeout: float, log: Callable[[str], None], hint: str = MIRROR_HINT
) -> None:
    """Download ``url`` atomically to ``dest`` with retries; raises _NotFound or InfraError.

    ``hint`` says which setting chooses the archive, for the error when it cannot be reached.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        for attempt in range(RETRIES + 1):
            try:
                log(f"downloading {url}")
                _download_once(url, tmp, timeout)
                os.replace(tmp, dest)
                return
            except (OSError, http.client.HTTPException) as e:
                if attempt == RETRIES:
                    raise InfraError(
                        f"cannot download {url} after {RETRIES + 1} attempts: {e}; "
                        f"check the network and the archive ({hint} to change it)"
                    ) from e
                log(f"download of {url} failed ({e}); retrying")
                time.sleep(BACKOFF_SECONDS * 2**attempt)
    finally:
        tmp.unlink(missing_ok=True)


def gpgv_verify(signed: Path, keyring: Path, timeout: float = 60.0) -> tuple[str, list[str]]:
    """Verify a clearsigned file with gpgv; return (signed text, valid fingerprints).

    Raises VerificationError on a bad or missing signature, InfraError if gpgv or the
    keyring is missing. The text returned is what gpgv says was signed, nothing else.
    """
    hint = "install them with `apt-get install gpgv debian-archive-keyring`"
    if not keyring.is_file():
        raise InfraError(f"the archive keyring {keyring} does not exist; {hint}")
    with tempfile.TemporaryDirectory(prefix="kmatrix-gpgv-") as tmpdir:
        out = Path(tmpdir) / "signed.txt"
        cmd = [
            "gpgv", "--homedir", tmpdir, "--keyring", str(keyring.resolve()),
            "--status-fd", "1", "--output", str(out), str(signed),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise InfraError(f"gpgv is not installed; {hint}") from None
        except subprocess.TimeoutExpired:
            raise InfraError(f"gpgv did not finish within {timeout:.0f}s on {signed}") from None
        valid, problems = parse_gpgv_status(proc.stdout)
        if not valid or any(p.startswith("BADSIG") for p in problems) or not out.exists():
            stderr_tail = (proc.stderr.strip().splitlines() or ["no signature"])[-1]
            detail = "; ".join(problems) or stderr_tail
            raise VerificationError(f"{signed}: no good signature from {keyring} ({detail})")
        return out.read_text(encoding="utf-8"), valid


def _require_clearsigned(path: Path, url: str) -> None:
    """An unsigned InRelease gets its own message: gpgv's ("no valid OpenPGP data") is obscure."""
    with open(path, "rb") as f:
        head = f.read(len(_CLEARSIGN_BEGIN) + 3).lstrip()
    if not head.startswith(_CLEARSIGN_BEGIN.encode()):
        raise VerificationError(
            f"{url} is not signed (no '{_CLEARSIGN_BEGIN}' header); kmatrix uses only signed "
            "archives: sign the Release file into InRelease (gpg --clearsign) and give its "
            "public key as `keyring:`"
        )


def _decompress(path: Path) -> bytes:
    if path.name.endswith(".xz"):
        with lzma.open(path) as f:
            return f.read()
    if path.name.endswith(".gz"):
        with gzip.open(path) as f:
            return f.read()
    return path.read_bytes()


def _valid_until_expired(valid_until: str, now: datetime) -> bool:
    try:
        when = email.utils.parsedate_to_datetime(valid_until)
    except (TypeError, ValueError):
        raise InfraError(f"unparsable Valid-Until {valid_until!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when < now


class Archive:
    """A verified, caching client for one Debian mirror (http(s):// or file://)."""

    def __init__(
        self,
        mirror: str,
        cache_dir: Path,
        *,
        keyring: Path = DEFAULT_KEYRING,
        check_valid_until: bool = True,
        arch: str = "amd64",
        component: str = "main",
        timeout: float = 60.0,
        log: Callable[[str], None] | None = None,
        hint: str = MIRROR_HINT,
    ) -> None:
        self.mirror = mirror.rstrip("/")
        self.hint = hint  # the setting that chooses this archive, named in errors
        self.cache_dir = cache_dir
        self.keyring = keyring
        # The environment switch exists for snapshot mirrors, whose InRelease is long expired.
        env = os.environ.get("KMATRIX_CHECK_VALID_UNTIL", "").strip().lower()
        self.check_valid_until = check_valid_until and env not in ("0", "false", "no")
        self.arch = arch
        self.component = component
        self.timeout = timeout
        self.log: Callable[[str], None] = log or (lambda _msg: None)
        self._indices: dict[str, SuiteIndex] = {}
        self._releases: dict[str, tuple[ReleaseInfo, Path]] = {}

    # -- indices --------------------------------------------------------------------------

    def _suite_dir(self, suite: str) -> Path:
        key = hashlib.sha256(f"{self.mirror}\n{suite}".encode()).hexdigest()[:16]
        return self.cache_dir / "indices" / f"{suite}-{key}"

    def _fetch_inrelease(self, suite: str) -> str:
        """The verified signed text of dists/SUITE/InRelease, from cache when fresh."""
        cached = self._suite_dir(suite) / "InRelease"
        ttl = float(os.environ.get("KMATRIX_INDEX_TTL", "3600"))
        if cached.is_file() and time.time() - cached.stat().st_mtime < ttl:
            try:
                text, _ = gpgv_verify(cached, self.keyring, self.timeout)
                self.log(f"using cached InRelease for {suite}")
                return text
            except VerificationError:
                self.log(f"cached InRelease for {suite} failed verification; fetching again")
                cached.unlink(missing_ok=True)
        url = f"{self.mirror}/dists/{suite}/InRelease"
        # A per-process name: two runs sharing the cache must not verify each other's file.
        fresh = cached.with_name(f"InRelease.{os.getpid()}.new")
        try:
            download(url, fresh, self.timeout, self.log, self.hint)
            _require_clearsigned(fresh, url)
            text, _ = gpgv_verify(fresh, self.keyring, self.timeout)
            os.replace(fresh, cached)
        except _NotFound:
            raise SuiteNotFound(
                f"suite {suite} does not exist on mirror {self.mirror} ({url} not found); "
                "check the suite name in matrix.yaml"
            ) from None
        except VerificationError as e:
            raise VerificationError(
                f"InRelease of suite {suite} from mirror {self.mirror} failed signature "
                f"verification ({e}); the file was deleted. If {self.keyring} is the key this "
                "archive signs with, the file was altered on the way: retry later or use another "
                "mirror; otherwise point `keyring:` at the archive's signing key"
            ) from None
        finally:
            fresh.unlink(missing_ok=True)
        return text

    def _check_release(self, suite: str, rel: ReleaseInfo) -> None:
        if suite not in (rel.suite, rel.codename):
            raise VerificationError(
                f"mirror {self.mirror} served an InRelease for {rel.suite}/{rel.codename} "
                f"when asked for suite {suite}; the mirror is misconfigured, use another"
            )
        if (
            self.check_valid_until
            and rel.valid_until
            and _valid_until_expired(rel.valid_until, datetime.now(UTC))
        ):
            raise VerificationError(
                f"InRelease of suite {suite} on {self.mirror} expired (Valid-Until "
                f"{rel.valid_until}); the mirror is stale. For snapshot mirrors set "
                "`check_valid_until: false` in matrix.yaml (or KMATRIX_CHECK_VALID_UNTIL=0)"
            )

    def _packages_path(self, suite: str, rel: ReleaseInfo) -> tuple[str, str, int]:
        base = f"{self.component}/binary-{self.arch}/Packages"
        for cand in (f"{base}.xz", f"{base}.gz", base):
            if cand in rel.sha256:
                sha, size = rel.sha256[cand]
                return cand, sha, size
        raise UserError(
            f"suite {suite} on {self.mirror} lists no {base} index; check `arch` and "
            f"component ({self.arch}, {self.component})"
        )

    def _fetch_packages(self, suite: str, rel: ReleaseInfo) -> Path:
        rel_path, sha, size = self._packages_path(suite, rel)
        cached = self.cache_dir / "indices" / "packages" / f"{sha}{Path(rel_path).suffix}"
        if cached.is_file():
            if cached.stat().st_size == size and sha256_of(cached) == sha:
                return cached
            self.log(f"cached {cached} is corrupt; fetching it again")
            cached.unlink()
        urls = [f"{self.mirror}/dists/{suite}/{rel_path}"]
        if rel.acquire_by_hash:
            # By-hash URLs never change content, so a mirror sync mid-run cannot race us.
            by_hash = f"{self.mirror}/dists/{suite}/{Path(rel_path).parent}/by-hash/SHA256/{sha}"
            urls.insert(0, by_hash)
        for url in urls:
            try:
                download(url, cached, self.timeout, self.log, self.hint)
                break
            except _NotFound:
                continue
        else:
            raise InfraError(
                f"{urls[-1]} is listed in InRelease of {suite} but missing; retry later"
            )
        actual_size, actual = cached.stat().st_size, sha256_of(cached)
        if actual_size != size or actual != sha:
            cached.unlink()
            raise VerificationError(
                f"{rel_path} of suite {suite} from {self.mirror} does not match InRelease "
                f"(expected sha256 {sha} size {size}, got {actual} size {actual_size}); "
                "the file was deleted. Retry later (the mirror may be mid-sync)"
            )
        return cached

    def _release(self, suite: str) -> tuple[ReleaseInfo, Path]:
        """The verified release info of ``suite`` and its verified Packages file (memoised)."""
        if suite in self._releases:
            return self._releases[suite]
        text = self._fetch_inrelease(suite)
        try:
            rel = parse_release(text, f"{suite} InRelease")
        except ValueError as e:
            raise InfraError(f"cannot parse InRelease of {suite} from {self.mirror}: {e}") from e
        self._check_release(suite, rel)
        self._releases[suite] = (rel, self._fetch_packages(suite, rel))
        return self._releases[suite]

    def verified_packages(self, suite: str) -> Path:
        """The verified Packages file of ``suite`` (named by its SHA256), without parsing it."""
        return self._release(suite)[1]

    def index(self, suite: str) -> SuiteIndex:
        """The verified package index of ``suite`` (memoised per Archive)."""
        if suite not in self._indices:
            self._indices[suite] = self._parse_index(suite, *self._release(suite))
        return self._indices[suite]

    def _parse_index(self, suite: str, rel: ReleaseInfo, path: Path) -> SuiteIndex:
        try:
            text = _decompress(path).decode("utf-8", "replace")
            packages = parse_packages(text, suite, f"{suite} Packages", self.mirror)
        except (ValueError, lzma.LZMAError, OSError, EOFError) as e:
            raise InfraError(
                f"cannot read the Packages index of {suite} ({path}): {e}; delete it and retry"
            ) from e
        return SuiteIndex(suite, rel.codename, rel.date, rel.valid_until, packages)

    def lookup(
        self, suite: str, key: str, compute: Callable[[SuiteIndex], list[PackageRecord]]
    ) -> list[PackageRecord]:
        """``compute(index)``, cached on disk per verified Packages file and ``key``.

        Parsing a whole Packages file takes seconds (sid's is 65 MB); the records a lookup
        returns only change when the signed index does, so an unchanged rerun skips parsing.
        """
        if suite not in self._indices:
            rel, path = self._release(suite)
            digest = hashlib.sha256(f"{path.name}\n{key}".encode()).hexdigest()[:24]
            memo = self.cache_dir / "indices" / "lookups" / f"{digest}.json"
            try:
                return [PackageRecord(**r) for r in json.loads(memo.read_text())]
            except (OSError, ValueError, TypeError):
                pass
            self._indices[suite] = self._parse_index(suite, rel, path)
            records = compute(self._indices[suite])
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps([dataclasses.asdict(r) for r in records]))
            os.replace(tmp, memo)
            return records
        return compute(self._indices[suite])

    # -- packages -------------------------------------------------------------------------

    def fetch(self, rec: PackageRecord) -> Path:
        """Download ``rec`` (or reuse the cache) and return the path of the verified .deb."""
        path = self.cache_dir / "debs" / f"{rec.sha256}.deb"
        if path.is_file():
            if path.stat().st_size == rec.size and sha256_of(path) == rec.sha256:
                return path
            self.log(f"cached {path} ({rec.name} {rec.version}) is corrupt; fetching it again")
            path.unlink()
        # The record names the archive whose signed index listed it (suites of one release
        # live in two archives); records from before that field default to this one.
        url = f"{rec.archive or self.mirror}/{rec.filename}"
        try:
            download(url, path, self.timeout, self.log, self.hint)
        except _NotFound:
            raise InfraError(
                f"{rec.name} {rec.version} is in the {rec.suite} index but {url} is missing "
                "(the mirror may be mid-sync); retry later"
            ) from None
        actual_size, actual = path.stat().st_size, sha256_of(path)
        if actual_size != rec.size or actual != rec.sha256:
            path.unlink()
            raise VerificationError(
                f"{rec.name} {rec.version} from {url} does not match the {rec.suite} Packages "
                f"index: expected sha256 {rec.sha256} ({rec.size} bytes), got {actual} "
                f"({actual_size} bytes); the file was deleted. Retry, or use another mirror"
            )
        return path

    def fetch_all(self, recs: Iterable[PackageRecord]) -> list[Path]:
        """Fetch every record, in order; see :meth:`fetch`."""
        return [self.fetch(r) for r in recs]
