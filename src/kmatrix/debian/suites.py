"""Which suites of which archives a kernel entry means, and resolving it across them as apt does.

``suite: bookworm`` means what ``apt-get install`` on a bookworm machine installs: the newest
version among bookworm, bookworm-updates (main archive) and bookworm-security (security
archive). ``suites: [...]`` names exactly the suites to look in; ``archive:`` points at another
Debian-format archive with its own key. Every suite is verified the same way (InRelease
signature, Packages SHA256, .deb SHA256) by :class:`kmatrix.debian.archive.Archive`.

Planning (which suites, where) is pure; resolving reads the verified indices, and its answer is
memoised on disk per set of verified Packages files, so an unchanged rerun parses nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmatrix.config import DebianKernel, Matrix
from kmatrix.debian.archive import Archive
from kmatrix.debian.packages import (
    KernelPackages,
    PackageRecord,
    SuiteIndex,
    max_version,
    resolve_kernel,
)
from kmatrix.debian.sources import (
    MIRROR_HINT,
    SECURITY_HINT,
    is_security_suite,
    resolve_mirror,
    resolve_security_mirror,
)
from kmatrix.debian.versions import compare_versions
from kmatrix.errors import InfraError, SuiteNotFound

DEBIAN = "debian"
DEBIAN_SECURITY = "debian-security"
# Suites without point releases or security support: they are all there is.
_ROLLING = frozenset({"sid", "unstable", "experimental", "rc-buggy"})
_POCKETS = ("-updates", "-security")
_VERSIONED_RE = re.compile(r"^linux-(?:image|binary)-\d+\.\d+[^-]*(?:-\d+)?-(?P<flavour>[a-z].*)$")
# Bump when what a memoised resolution holds changes.
_MEMO_FORMAT = 1


@dataclass(frozen=True)
class Mirrors:
    """The base URLs of Debian's two archives, as found for this run."""

    main: str
    security: str | None
    security_origin: str  # where the security URL came from, or why there is none


@dataclass(frozen=True)
class Source:
    """One suite of one archive that a kernel entry looks in."""

    archive: str  # recorded in results: debian, debian-security, or the user's archive name
    url: str | None  # None: Debian's security archive, and none is configured
    suite: str
    components: tuple[str, ...]
    keyring: Path
    implied: bool  # added by release expansion: missing from its archive means skipped
    hint: str  # the setting that chooses ``url``, for errors
    own: bool  # the user's own archive: its URL is theirs and goes into results


@dataclass(frozen=True)
class ResolvedKernel:
    """A kernel entry resolved across its suites, with what the results say about where from."""

    packages: KernelPackages
    sources: tuple[Source, ...]  # the suites that were looked in
    skipped: tuple[str, ...] = ()  # implied suites their archive does not have
    stale_pin: dict[str, str] | None = None  # a pinned version older than the newest offer

    @property
    def primary(self) -> PackageRecord:
        """The package holding vmlinuz."""
        return self.packages.primary

    def provenance(self) -> dict[str, Any]:
        """Suite, archive and stale-pin facts for the results' kernel entry."""
        p = self.primary
        source = next((s for s in self.sources if (s.url, s.suite) == (p.archive, p.suite)), None)
        info: dict[str, Any] = {
            "suite": p.suite,
            "archive": source.archive if source else None,
            "suites": [f"{s.archive}:{s.suite}" for s in self.sources],
            "stale_pin": self.stale_pin,
        }
        if source is not None and source.own:
            # Debian's URLs are the host's choice of mirror and stay out of the results.
            info["archive_url"] = source.url
        if self.skipped:
            info["skipped_suites"] = list(self.skipped)
        return info


def release_suites(suite: str) -> list[tuple[str, bool]]:
    """The suites apt would use for ``suite``, each with whether it was implied.

    ``bookworm`` -> bookworm, bookworm-updates, bookworm-security; a rolling suite (sid,
    experimental) or one that already names a pocket (bookworm-security) is only itself.
    """
    if suite in _ROLLING or "-" in suite or "/" in suite:
        return [(suite, False)]
    return [(suite, False), *((suite + pocket, True) for pocket in _POCKETS)]


def plan_sources(kernel: DebianKernel, matrix: Matrix, mirrors: Mirrors) -> list[Source]:
    """Every suite ``kernel`` looks in, in order, and the archive each one is in (pure)."""
    other = matrix.archive_of(kernel)
    if other is not None:
        name = kernel.archive if isinstance(kernel.archive, str) else other.url
        suites = kernel.suites or ([kernel.suite] if kernel.suite else other.suites or [])
        keyring = other.keyring.expanduser()
        hint = f"set `url:` of archive {name} in matrix.yaml"
        return [
            Source(name, other.url.rstrip("/"), s, tuple(other.components), keyring, False,
                   hint, True)
            for s in suites
        ]  # fmt: skip
    pairs = [(s, False) for s in kernel.suites] if kernel.suites else []
    pairs = pairs or release_suites(kernel.suite or "")
    out = []
    for suite, implied in pairs:
        security = is_security_suite(suite)
        url = mirrors.security if security else mirrors.main
        label, hint = (DEBIAN_SECURITY, SECURITY_HINT) if security else (DEBIAN, MIRROR_HINT)
        out.append(Source(label, url, suite, ("main",), matrix.keyring, implied, hint, False))
    return out


def merge_indices(indices: list[SuiteIndex]) -> SuiteIndex:
    """One index holding every record of ``indices``: apt's view of several suites at once."""
    merged: dict[str, list[PackageRecord]] = {}
    for index in indices:
        for name, records in index.packages.items():
            merged.setdefault(name, []).extend(records)
    first = indices[0]
    suite = "+".join(dict.fromkeys(i.suite for i in indices))
    return SuiteIndex(suite, first.codename, first.date, first.valid_until, merged)


def flavour_metapackage(package: str) -> str | None:
    """``linux-image-6.1.0-50-cloud-amd64`` -> ``linux-image-cloud-amd64``; None if unversioned."""
    m = _VERSIONED_RE.match(package)
    return f"linux-image-{m['flavour']}" if m else None


def find_stale_pin(index: SuiteIndex, package: str, version: str | None) -> dict[str, str] | None:
    """When ``version`` is pinned and the suites offer a newer kernel, what they offer.

    A security update usually renames the package (a new ABI number), so the newest offer is
    the newest of the package itself and of its flavour's metapackage, which carries the
    kernel's version.
    """
    if version is None:
        return None
    names = [package, *filter(None, [flavour_metapackage(package)])]
    records = [r for n in names for r in index.packages.get(n, [])]
    if not records:
        return None
    newest = max_version(records)
    if compare_versions(newest.version, version) <= 0:
        return None
    return {"pinned": version, "newest": newest.version, "package": newest.name,
            "suite": newest.suite}  # fmt: skip


class Resolver:
    """Resolves kernel entries for one run; owns one verified Archive per (URL, component, arch)."""

    def __init__(
        self, matrix: Matrix, cache: Path, log: Callable[[str], None] = lambda _m: None
    ) -> None:
        self.matrix, self.cache, self.log = matrix, cache, log
        main = resolve_mirror(matrix.mirror)
        security, origin = resolve_security_mirror(matrix.security_mirror, main, matrix.mirror)
        self.mirrors = Mirrors(main, security, origin)
        self._archives: dict[tuple[str, Path, str, str], Archive] = {}

    def archive(self, url: str, arch: str, component: str = "main",
                keyring: Path | None = None, hint: str = MIRROR_HINT) -> Archive:  # fmt: skip
        """The (shared) verified client of one archive, component and architecture."""
        keyring = keyring or self.matrix.keyring
        key = (url, keyring, component, arch)
        if key not in self._archives:
            self._archives[key] = Archive(
                url, self.cache, keyring=keyring, check_valid_until=self.matrix.check_valid_until,
                arch=arch, component=component, log=self.log, hint=hint,
            )  # fmt: skip
        return self._archives[key]

    def main_archive(self, arch: str) -> Archive:
        """Debian's main archive for ``arch``: the guest userland comes from it."""
        return self.archive(self.mirrors.main, arch)

    def resolve(self, kernel: DebianKernel) -> ResolvedKernel:
        """Resolve ``kernel`` across its suites; InfraError names an archive it cannot use."""
        sources = plan_sources(kernel, self.matrix, self.mirrors)
        found, skipped = self._verified(sources, kernel.arch)
        used = tuple(dict.fromkeys(src for src, _, _ in found))
        ids = [f"{a.mirror}\n{src.suite}\n{a.component}\n{path.name}" for src, a, path in found]
        key = "\n".join([str(_MEMO_FORMAT), kernel.package, str(kernel.version), *ids])
        memo = self.cache / "indices" / "lookups" / f"{_digest(key)}.json"
        try:
            data = json.loads(memo.read_text())
            records = [PackageRecord(**r) for r in data["records"]]
            stale = data["stale_pin"]
        except (OSError, ValueError, TypeError, KeyError):
            index = merge_indices([a.index(src.suite) for src, a, _ in found])
            records = resolve_kernel(index, kernel.package, kernel.version).records
            stale = find_stale_pin(index, kernel.package, kernel.version)
            _write_json(memo, {"records": [dataclasses.asdict(r) for r in records],
                               "stale_pin": stale})  # fmt: skip
        # resolve_kernel lists the primary package (the one carrying vmlinuz) first.
        packages = KernelPackages(primary=records[0], records=records)
        return ResolvedKernel(packages, used, tuple(skipped), stale)

    def _verified(
        self, sources: list[Source], arch: str
    ) -> tuple[list[tuple[Source, Archive, Path]], list[str]]:
        """Each source's verified Packages files; implied suites an archive lacks are skipped."""
        found: list[tuple[Source, Archive, Path]] = []
        skipped: list[str] = []
        for src in sources:
            if src.url is None:
                release = src.suite.removesuffix("-security")
                raise InfraError(
                    f"suite {src.suite} is in Debian's security archive, but its URL is not "
                    f"known ({self.mirrors.security_origin}); or run without security updates: "
                    f"suites: [{release}, {release}-updates]"
                )
            for component in src.components:
                archive = self.archive(src.url, arch, component, src.keyring, src.hint)
                try:
                    found.append((src, archive, archive.verified_packages(src.suite)))
                except SuiteNotFound:
                    if not src.implied:
                        raise
                    if src.archive == DEBIAN_SECURITY:
                        # Never run an older kernel quietly because security updates are missing.
                        release = src.suite.removesuffix("-security")
                        raise InfraError(
                            f"Debian's security archive {src.url} ({self.mirrors.security_origin})"
                            f" has no suite {src.suite}; or run without security updates: "
                            f"suites: [{release}, {release}-updates]"
                        ) from None
                    self.log(f"{src.archive} has no suite {src.suite}; skipping it")
                    skipped.append(f"{src.archive}:{src.suite}")
                    break
        return found, skipped


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
