"""Where Debian's archives are: the host's apt sources, matrix.yaml or the environment.

Debian publishes a release in two archives: the main one (``bookworm``, ``bookworm-updates``)
and the security one (``bookworm-security``), usually at different base URLs. apt reads both
from ``/etc/apt/sources.list``, ``sources.list.d/*.list`` and deb822 ``*.sources``; kmatrix reads
the same files, so a host that can ``apt-get install`` a kernel can measure that kernel.
No host name is built in: every URL comes from the host or from configuration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kmatrix.debian.deb822 import parse_deb822
from kmatrix.errors import UserError

DEFAULT_APT_SOURCES: tuple[Path, ...] = (
    Path("/etc/apt/sources.list"),
    Path("/etc/apt/sources.list.d"),
)
MIRROR_HINT = "set `mirror:` in matrix.yaml or the environment variable KMATRIX_MIRROR"
SECURITY_HINT = (
    "set `security_mirror:` in matrix.yaml or the environment variable KMATRIX_SECURITY_MIRROR"
)


@dataclass(frozen=True)
class SourceEntry:
    """One (type, URI, suites) entry from an apt sources file."""

    type: str
    uri: str
    suites: tuple[str, ...]


_SECURITY_MARKS = ("-security", "/updates")  # bullseye-security; buster/updates before it
_SECONDARY_SUFFIXES = ("-updates", "-backports", "-proposed-updates")
_URI_RE = re.compile(r"^(https?|file|ftp)://")


def parse_one_line_sources(text: str) -> list[SourceEntry]:
    """Parse a one-line-style ``sources.list`` (``deb [opts] URI SUITE COMPONENTS...``)."""
    out: list[SourceEntry] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)
        parts = line.split()
        if len(parts) >= 3:
            out.append(SourceEntry(parts[0], parts[1], (parts[2],)))
    return out


def parse_deb822_sources(text: str, origin: str = "<sources>") -> list[SourceEntry]:
    """Parse a deb822 ``.sources`` file; stanzas with ``Enabled: no`` are dropped."""
    out: list[SourceEntry] = []
    for st in parse_deb822(text, origin):
        low = {k.lower(): v for k, v in st.items()}
        if low.get("enabled", "yes").strip().lower() == "no":
            continue
        suites = tuple(low.get("suites", "").split())
        for typ in low.get("types", "").split():
            for uri in low.get("uris", "").split():
                out.append(SourceEntry(typ, uri, suites))
    return out


def is_security_suite(suite: str) -> bool:
    """Whether ``suite`` lives in Debian's security archive (``bookworm-security``)."""
    return any(mark in suite for mark in _SECURITY_MARKS)


def _binary_entries(entries: Sequence[SourceEntry]) -> list[SourceEntry]:
    return [e for e in entries if e.type == "deb" and _URI_RE.match(e.uri)]


def pick_main_mirror(entries: Sequence[SourceEntry]) -> str | None:
    """Pick the URI of Debian's main archive from apt entries, or None.

    Security entries live in another archive and never qualify. An entry with a plain suite
    (``bookworm``) beats one with only ``-updates``/``-backports`` suites, which still point
    at the main archive and are used only when nothing better exists.
    """
    fallback: str | None = None
    for e in _binary_entries(entries):
        suites = [s for s in e.suites if not is_security_suite(s)]
        if not suites:
            continue
        if any(not s.endswith(_SECONDARY_SUFFIXES) for s in suites):
            return e.uri.rstrip("/")
        fallback = fallback or e.uri.rstrip("/")
    return fallback


def pick_security_mirror(entries: Sequence[SourceEntry]) -> str | None:
    """The URI of the first ``deb`` entry that carries a security suite, or None."""
    for e in _binary_entries(entries):
        if any(is_security_suite(s) for s in e.suites):
            return e.uri.rstrip("/")
    return None


def _sources_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(c for c in p.iterdir() if c.suffix in (".list", ".sources")))
        elif p.is_file():
            files.append(p)
    return [f for f in files if ".disabled" not in f.name]


def read_apt_sources(paths: Sequence[Path] = DEFAULT_APT_SOURCES) -> list[SourceEntry]:
    """Every entry of the apt sources files under ``paths``, in apt's file order."""
    entries: list[SourceEntry] = []
    for f in _sources_files(paths):
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
            if f.suffix == ".sources":
                entries.extend(parse_deb822_sources(text, str(f)))
            else:
                entries.extend(parse_one_line_sources(text))
        except (OSError, ValueError):
            # One unreadable or malformed file must not hide a good entry in another.
            continue
    return entries


def mirror_from_apt_sources(paths: Sequence[Path] = DEFAULT_APT_SOURCES) -> str:
    """Return the Debian main-archive URI from the host's apt sources (no trailing slash)."""
    uri = pick_main_mirror(read_apt_sources(paths))
    if uri is None:
        where = ", ".join(str(p) for p in paths)
        raise UserError(
            f"no Debian main archive `deb` entry found in the apt sources ({where}); "
            f"{MIRROR_HINT} to the Debian mirror URL"
        )
    return uri


def _configured(env_var: str, configured: str | None) -> str | None:
    env = os.environ.get(env_var, "").strip()
    if env:
        return env.rstrip("/")
    if configured and configured.strip():
        return configured.strip().rstrip("/")
    return None


def resolve_mirror(configured: str | None) -> str:
    """The mirror to use: env KMATRIX_MIRROR, then ``configured``, then the apt sources."""
    return _configured("KMATRIX_MIRROR", configured) or mirror_from_apt_sources()


def resolve_security_mirror(
    configured: str | None,
    main_mirror: str,
    main_configured: str | None = None,
    paths: Sequence[Path] = DEFAULT_APT_SOURCES,
) -> tuple[str | None, str]:
    """The security archive's base URL and where it came from (for logs and errors).

    Order: env KMATRIX_SECURITY_MIRROR, then ``configured`` (matrix.yaml); then, when the main
    mirror was chosen by configuration (``main_configured`` or KMATRIX_MIRROR), the same
    host's ``…/debian-security`` next to its ``…/debian`` (Debian's own layout, which most
    mirrors copy): the host's apt sources pair with the host's main mirror, not with that
    one. Otherwise the apt sources, then that layout. (None, why) when nothing gives one.
    """
    explicit = _configured("KMATRIX_SECURITY_MIRROR", configured)
    if explicit:
        return explicit, "configured"
    beside = main_mirror + "-security" if main_mirror.endswith("/debian") else None
    if beside and _configured("KMATRIX_MIRROR", main_configured):
        return beside, f"next to the configured mirror; {SECURITY_HINT} to change it"
    from_apt = pick_security_mirror(read_apt_sources(paths))
    if from_apt:
        return from_apt, f"from the apt sources; {SECURITY_HINT} to change it"
    if beside:
        return beside, f"next to the mirror; {SECURITY_HINT} to change it"
    return None, f"no -security entry in the apt sources; {SECURITY_HINT}"
