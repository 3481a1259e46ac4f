"""What a verified Packages index says: its records, Release and Depends fields, and how a
kernel package is followed through its Depends to every part that holds the kernel.

Pure: nothing here touches the network, the disk or a subprocess (kmatrix.debian.archive does).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from kmatrix.debian.deb822 import parse_deb822
from kmatrix.debian.versions import VersionKey, compare_versions
from kmatrix.errors import UserError

KERNEL_PREFIXES = ("linux-image-", "linux-binary-", "linux-modules-", "linux-base-")


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
        available = ", ".join(sorted((r.version for r in candidates), key=VersionKey))
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


def max_version(records: Iterable[PackageRecord]) -> PackageRecord:
    """The record with the highest Debian version."""
    best: PackageRecord | None = None
    for rec in records:
        if best is None or compare_versions(rec.version, best.version) > 0:
            best = rec
    if best is None:
        raise ValueError("max_version() needs at least one record")
    return best


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
