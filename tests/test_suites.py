"""Suite semantics on recorded real Packages excerpts (a release and its security suite),
planning, stale pins, the security archive's discovery, and how the report and
`invoke check` show stale pins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmatrix.config import parse_matrix
from kmatrix.debian.archive import SuiteIndex, parse_packages, resolve_kernel
from kmatrix.debian.sources import (
    parse_deb822_sources,
    pick_security_mirror,
    resolve_security_mirror,
)
from kmatrix.debian.suites import (
    Mirrors,
    ResolvedKernel,
    find_stale_pin,
    flavour_metapackage,
    merge_indices,
    plan_sources,
    release_suites,
)
from kmatrix.errors import ExpectationFailed, UserError
from kmatrix.gate.check import check_file
from kmatrix.report.markdown import render_report

FIXTURES = Path(__file__).parent / "fixtures"


def recorded(suite: str, archive: str) -> SuiteIndex:
    """A real Packages excerpt recorded from the archive (kernel stanzas only)."""
    text = (FIXTURES / "debian" / f"{suite}.Packages").read_text()
    return SuiteIndex(suite, suite, "", None, parse_packages(text, suite, suite, archive))


def bookworm_as_apt_sees_it() -> SuiteIndex:
    return merge_indices([
        recorded("bookworm", "http://main.example.invalid/debian"),
        recorded("bookworm-updates", "http://main.example.invalid/debian"),
        recorded("bookworm-security", "http://sec.example.invalid/debian-security"),
    ])  # fmt: skip


def test_release_with_security_resolves_to_the_security_kernel() -> None:
    k = resolve_kernel(bookworm_as_apt_sees_it(), "linux-image-cloud-amd64")
    # What `apt-get install linux-image-cloud-amd64` installs on bookworm on the day recorded.
    assert (k.primary.name, k.primary.version) == ("linux-image-6.1.0-57-cloud-amd64", "6.1.192-3")
    assert k.primary.suite == "bookworm-security"
    assert k.primary.archive == "http://sec.example.invalid/debian-security"
    # bookworm-security also carries the 6.12 backport images: the metapackage decides.
    assert not any(r.name.startswith("linux-image-6.12") for r in k.records)


def test_release_alone_is_the_point_release() -> None:
    k = resolve_kernel(recorded("bookworm", "m"), "linux-image-cloud-amd64")
    assert (k.primary.version, k.primary.suite) == ("6.1.176-1", "bookworm")


def test_trixie_and_trixie_security() -> None:
    index = merge_indices([recorded("trixie", "m"), recorded("trixie-security", "s")])
    k = resolve_kernel(index, "linux-image-cloud-amd64")
    assert k.primary.name == "linux-image-6.12.118+deb13-cloud-amd64"
    assert (k.primary.version, k.primary.suite) == ("6.12.118-1", "trixie-security")


def test_pin_across_suites_and_stale_pin() -> None:
    index = bookworm_as_apt_sees_it()
    k = resolve_kernel(index, "linux-image-6.1.0-50-cloud-amd64", "6.1.176-1")
    assert k.primary.version == "6.1.176-1"
    stale = find_stale_pin(index, "linux-image-6.1.0-50-cloud-amd64", "6.1.176-1")
    # The security update renamed the package (ABI 57): the flavour's metapackage says so.
    assert stale == {
        "pinned": "6.1.176-1",
        "newest": "6.1.192-3",
        "package": "linux-image-cloud-amd64",
        "suite": "bookworm-security",
    }
    assert find_stale_pin(index, "linux-image-cloud-amd64", "6.1.192-3") is None
    assert find_stale_pin(index, "linux-image-cloud-amd64", None) is None
    assert find_stale_pin(recorded("bookworm", "m"), "linux-image-cloud-amd64", "6.1.176-1") is None


def test_missing_version_names_every_suite() -> None:
    with pytest.raises(UserError) as e:
        resolve_kernel(bookworm_as_apt_sees_it(), "linux-image-cloud-amd64", "6.1.1-1")
    msg = str(e.value)
    assert "bookworm+bookworm-updates+bookworm-security" in msg and "6.1.192-3" in msg


@pytest.mark.parametrize(
    ("package", "meta"),
    [
        ("linux-image-6.1.0-50-cloud-amd64", "linux-image-cloud-amd64"),
        ("linux-image-6.12.117+deb13-cloud-amd64", "linux-image-cloud-amd64"),
        ("linux-image-7.3-cloud-amd64", "linux-image-cloud-amd64"),
        ("linux-binary-7.2.13+deb14-cloud-amd64", "linux-image-cloud-amd64"),
        ("linux-image-6.1.0-50-amd64", "linux-image-amd64"),
        ("linux-image-cloud-amd64", None),
    ],
)
def test_flavour_metapackage(package: str, meta: str | None) -> None:
    assert flavour_metapackage(package) == meta


@pytest.mark.parametrize(
    ("suite", "expanded"),
    [
        ("bookworm", ["bookworm", "bookworm-updates", "bookworm-security"]),
        ("stable", ["stable", "stable-updates", "stable-security"]),
        ("sid", ["sid"]),
        ("unstable", ["unstable"]),
        ("experimental", ["experimental"]),
        ("bookworm-backports", ["bookworm-backports"]),
        ("bookworm-security", ["bookworm-security"]),
    ],
)
def test_release_suites(suite: str, expanded: list[str]) -> None:
    assert [s for s, _ in release_suites(suite)] == expanded
    assert release_suites(suite)[0][1] is False  # the suite named is never optional


MIRRORS = Mirrors("http://m.example.invalid/debian", "http://s.example.invalid/ds", "test")


def test_plan_routes_security_suites_to_the_security_archive() -> None:
    m = parse_matrix(
        "kernels:\n"
        "  - {name: a, suite: bookworm, package: p}\n"
        "  - {name: b, suites: [bookworm, bookworm-security], package: p}\n"
    )
    a = plan_sources(m.kernels[0], m, MIRRORS)
    assert [(s.archive, s.url, s.suite, s.implied) for s in a] == [
        ("debian", MIRRORS.main, "bookworm", False),
        ("debian", MIRRORS.main, "bookworm-updates", True),
        ("debian-security", MIRRORS.security, "bookworm-security", True),
    ]
    b = plan_sources(m.kernels[1], m, MIRRORS)
    assert [(s.suite, s.implied) for s in b] == [("bookworm", False), ("bookworm-security", False)]


def test_provenance_keeps_debian_urls_out_of_results() -> None:
    m = parse_matrix("kernels:\n  - {name: a, suite: bookworm, package: linux-image-cloud-amd64}\n")
    sources = plan_sources(m.kernels[0], m, MIRRORS)
    index = merge_indices([
        recorded("bookworm", MIRRORS.main), recorded("bookworm-security", str(MIRRORS.security))
    ])  # fmt: skip
    res = ResolvedKernel(resolve_kernel(index, "linux-image-cloud-amd64"), tuple(sources))
    prov = res.provenance()
    assert prov["suite"] == "bookworm-security" and prov["archive"] == "debian-security"
    assert "example.invalid" not in json.dumps(prov)


SOURCES = """\
Types: deb
URIs: http://main.example.invalid/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://sec.example.invalid/debian-security/
Suites: bookworm-security
Components: main
"""


def test_security_mirror_from_apt_sources_and_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KMATRIX_SECURITY_MIRROR", raising=False)
    monkeypatch.delenv("KMATRIX_MIRROR", raising=False)
    assert pick_security_mirror(parse_deb822_sources(SOURCES)) == (
        "http://sec.example.invalid/debian-security"
    )
    (tmp_path / "debian.sources").write_text(SOURCES)
    main = "http://main.example.invalid/debian"
    url, origin = resolve_security_mirror(None, main, None, [tmp_path])
    assert url == "http://sec.example.invalid/debian-security" and "apt sources" in origin
    # A configured main mirror gets the security archive beside it, not the host's.
    url, _ = resolve_security_mirror(None, "http://snap.example.invalid/debian", "x", [tmp_path])
    assert url == "http://snap.example.invalid/debian-security"
    assert resolve_security_mirror("http://cfg.example.invalid/s/", main, None, [tmp_path])[0] == (
        "http://cfg.example.invalid/s"
    )
    monkeypatch.setenv("KMATRIX_SECURITY_MIRROR", "http://env.example.invalid/s")
    assert resolve_security_mirror("http://cfg.example.invalid/s", main, None, [tmp_path])[0] == (
        "http://env.example.invalid/s"
    )
    monkeypatch.delenv("KMATRIX_SECURITY_MIRROR")
    empty = tmp_path / "none"
    empty.mkdir()
    url, why = resolve_security_mirror(None, "http://x.example.invalid/os", None, [empty])
    assert url is None and "security_mirror:" in why and "KMATRIX_SECURITY_MIRROR" in why


def _stale_results(tmp_path: Path) -> Path:
    results = json.loads((FIXTURES / "results" / "dev-6.1.json").read_text())
    kernel = results["cells"][0]["kernel"]
    kernel.update(
        suite="bookworm", archive="debian",
        stale_pin={"pinned": kernel["version"], "newest": "6.1.192-3",
                   "package": "linux-image-cloud-amd64", "suite": "bookworm-security"},
    )  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return path


def test_stale_pin_is_shown_next_to_the_cell_and_can_fail_check(tmp_path: Path) -> None:
    path = _stale_results(tmp_path)
    results = json.loads(path.read_text())
    text = render_report(results)
    cell = results["cells"][0]["id"]
    row = next(line for line in text.splitlines() if line.startswith(f"| {cell} ") and "ok" in line)
    assert "⚠️ stale pin: 6.1.192-3 in bookworm-security" in row
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("kernels:\n  - {name: a, suite: bookworm, package: p}\n")
    summary = check_file(path, matrix)
    assert "1 stale pin(s)" in summary and "offers linux-image-cloud-amd64 6.1.192-3" in summary
    with pytest.raises(ExpectationFailed) as e:
        check_file(path, matrix, fail_on_stale=True)
    assert e.value.exit_code == 1
    assert f"cell {cell}: pinned" in str(e.value) and "update `version:`" in str(e.value)
