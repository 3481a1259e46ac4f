"""A verified Debian archive client that needs no root.

Chain of trust: ``dists/SUITE/InRelease`` is checked with ``gpgv`` against the Debian archive
keyring, the ``Packages`` index is checked against the SHA256 list in that InRelease, and each
``.deb`` is checked against its ``Packages`` record. Everything downloaded is cached under
``cache_dir`` and re-hashed before use.

The pieces live beside it: kmatrix.debian.packages (records, Release and Depends, kernel
resolution), kmatrix.debian.versions (Debian version order), kmatrix.debian.gpg (gpgv),
kmatrix.debian.download (one URL with retries), kmatrix.debian.debfile (.deb extraction),
kmatrix.debian.deb822 and kmatrix.debian.sources (mirror discovery). Their public names are
re-exported here, where callers have always found them.
"""

from __future__ import annotations

import dataclasses
import email.utils
import gzip
import hashlib
import json
import lzma
import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from kmatrix.artifacts import sha256_of
from kmatrix.debian.deb822 import parse_deb822 as parse_deb822
from kmatrix.debian.debfile import extract_deb as extract_deb
from kmatrix.debian.download import NotFound, download
from kmatrix.debian.gpg import gpgv_verify, require_clearsigned
from kmatrix.debian.gpg import parse_gpgv_status as parse_gpgv_status
from kmatrix.debian.packages import KERNEL_PREFIXES as KERNEL_PREFIXES
from kmatrix.debian.packages import Dependency as Dependency
from kmatrix.debian.packages import KernelPackages as KernelPackages
from kmatrix.debian.packages import (
    PackageRecord,
    ReleaseInfo,
    SuiteIndex,
    parse_packages,
    parse_release,
)
from kmatrix.debian.packages import is_kernel_part as is_kernel_part
from kmatrix.debian.packages import max_version as max_version
from kmatrix.debian.packages import parse_depends as parse_depends
from kmatrix.debian.packages import resolve_kernel as resolve_kernel
from kmatrix.debian.sources import DEFAULT_APT_SOURCES as DEFAULT_APT_SOURCES
from kmatrix.debian.sources import MIRROR_HINT
from kmatrix.debian.sources import SourceEntry as SourceEntry
from kmatrix.debian.sources import mirror_from_apt_sources as mirror_from_apt_sources
from kmatrix.debian.sources import parse_deb822_sources as parse_deb822_sources
from kmatrix.debian.sources import parse_one_line_sources as parse_one_line_sources
from kmatrix.debian.sources import pick_main_mirror as pick_main_mirror
from kmatrix.debian.sources import resolve_mirror as resolve_mirror
from kmatrix.debian.versions import compare_versions as compare_versions
from kmatrix.errors import InfraError, UserError, VerificationError
from kmatrix.errors import SuiteNotFound as SuiteNotFound

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def default_cache_dir() -> Path:
    """$KMATRIX_CACHE, else $XDG_CACHE_HOME/kmatrix, else ~/.cache/kmatrix."""
    if os.environ.get("KMATRIX_CACHE"):
        return Path(os.environ["KMATRIX_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kmatrix"
    return Path.home() / ".cache" / "kmatrix"


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
            require_clearsigned(fresh, url)
            text, _ = gpgv_verify(fresh, self.keyring, self.timeout)
            os.replace(fresh, cached)
        except NotFound:
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
            except NotFound:
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
        except NotFound:
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
