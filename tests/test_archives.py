"""Other Debian-format archives and Debian's two archives, end to end over real HTTP.

Each test builds a small archive with dpkg-deb, signs its InRelease with a throwaway gpg key,
serves it on 127.0.0.1 with http.server and resolves, downloads and extracts a kernel from
it through kmatrix.debian.suites.Resolver: the same code path `invoke matrix` takes.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmatrix.config import Matrix, parse_matrix
from kmatrix.debian import download as fetching
from kmatrix.debian.suites import Resolver
from kmatrix.errors import InfraError, UserError, VerificationError
from kmatrix.guest.kernels import prepare_debian
from kmatrix.run import matrix as runner
from kmatrix.run import pool
from kmatrix.run.progress import Progress
from localarchive import Key, LocalArchive, Pkg, build_deb, make_key, serve

RELEASE = "9.9.0-1-team-amd64"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Key, Key]]:
    """The archive's signing key and another one, which must not be accepted in its place."""
    base = tmp_path_factory.mktemp("keys")
    pair = (make_key(base, "archive"), make_key(base, "stranger"))
    yield pair
    for key in pair:
        key.stop_agent()


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    work = tmp_path_factory.mktemp("debs")
    files = {
        f"boot/vmlinuz-{RELEASE}": b"bzImage of 9.9.1",
        f"boot/config-{RELEASE}": b"CONFIG_MEMCG=y\n# CONFIG_SWAP is not set\n",
        f"lib/modules/{RELEASE}/modules.dep": b"",
    }
    return {
        "image": build_deb(work, f"linux-image-{RELEASE}", "9.9.1-1", files),
        "meta": build_deb(work, "linux-image-team-amd64", "9.9.1-1", {}),
        "old": build_deb(work, "linux-image-9.9.0-0-team-amd64", "9.9.0-1", files),
    }


def kernel_pkgs(debs: dict[str, bytes]) -> list[Pkg]:
    return [
        Pkg("linux-image-team-amd64", "9.9.1-1", debs["meta"],
            f"linux-image-{RELEASE} (= 9.9.1-1), initramfs-tools | linux-initramfs-tool"),
        Pkg(f"linux-image-{RELEASE}", "9.9.1-1", debs["image"], "kmod"),
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetching, "BACKOFF_SECONDS", 0.0)
    for var in ("KMATRIX_MIRROR", "KMATRIX_SECURITY_MIRROR", "KMATRIX_INDEX_TTL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def team(tmp_path: Path, keys: tuple[Key, Key], debs: dict[str, bytes]) -> Iterator[str]:
    """A served archive with suite `stable`: the kernel in component `extra`, junk in `main`."""
    archive = LocalArchive(tmp_path / "www" / "team", keys[0])
    junk = Pkg("linux-image-9.9.0-0-team-amd64", "9.9.0-1", debs["old"])
    archive.publish("stable", {"main": [junk], "extra": kernel_pkgs(debs)})
    with serve(tmp_path / "www") as url:
        yield url


def team_matrix(url: str, keyring: Path, extra: str = "") -> Matrix:
    return parse_matrix(
        f"""
mirror: {url}/debian
check_valid_until: false
archives:
  team: {{url: {url}/team, keyring: {keyring}, suites: [stable], components: [main, extra]}}
kernels:
  - {{name: team, archive: team, package: linux-image-team-amd64{extra}}}
"""
    )


def resolve_and_fetch(matrix: Matrix, cache: Path) -> tuple[Resolver, object]:
    resolver = Resolver(matrix, cache)
    (k,) = matrix.kernels
    res = resolver.resolve(k)
    return resolver, prepare_debian(resolver.main_archive("amd64"), k, res, cache)


def test_good_signature_resolves_fetches_and_records_the_archive(
    team: str, keys: tuple[Key, Key], tmp_path: Path
) -> None:
    matrix = team_matrix(team, keys[0].keyring)
    _, prepared = resolve_and_fetch(matrix, tmp_path / "cache")
    assert prepared.vmlinuz.read_bytes() == b"bzImage of 9.9.1"  # type: ignore[attr-defined]
    assert prepared.release == RELEASE  # type: ignore[attr-defined]
    assert prepared.config["CONFIG_SWAP"] == "n"  # type: ignore[attr-defined]
    prov = prepared.provenance  # type: ignore[attr-defined]
    assert (prov["package"], prov["version"], prov["suite"]) == (
        f"linux-image-{RELEASE}", "9.9.1-1", "stable",
    )  # fmt: skip
    # The user's own archive is named with its URL; the packages came from component extra.
    assert (prov["archive"], prov["archive_url"]) == ("team", f"{team}/team")
    assert prov["suites"] == ["team:stable"]


def test_wrong_key_is_refused_naming_suite_keyring_and_next_step(
    team: str, keys: tuple[Key, Key], tmp_path: Path
) -> None:
    matrix = team_matrix(team, keys[1].keyring)
    with pytest.raises(VerificationError) as e:
        resolve_and_fetch(matrix, tmp_path / "cache")
    msg = str(e.value)
    assert f"InRelease of suite stable from mirror {team}/team" in msg
    assert str(keys[1].keyring) in msg and "point `keyring:` at the archive's signing key" in msg
    assert not list((tmp_path / "cache" / "indices").rglob("InRelease*"))


def test_unsigned_inrelease_is_refused(
    tmp_path: Path, keys: tuple[Key, Key], debs: dict[str, bytes]
) -> None:
    LocalArchive(tmp_path / "www" / "team", keys[0]).publish(
        "stable", {"extra": kernel_pkgs(debs)}, sign=False
    )
    with serve(tmp_path / "www") as url, pytest.raises(VerificationError) as e:
        resolve_and_fetch(team_matrix(url, keys[0].keyring), tmp_path / "cache")
    msg = str(e.value)
    assert f"{url}/team/dists/stable/InRelease is not signed" in msg
    assert "gpg --clearsign" in msg


def test_tampered_packages_is_refused(team: str, keys: tuple[Key, Key], tmp_path: Path) -> None:
    xz = tmp_path / "www/team/dists/stable/extra/binary-amd64/Packages.xz"
    xz.write_bytes(xz.read_bytes() + b"\0")
    with pytest.raises(VerificationError) as e:
        resolve_and_fetch(team_matrix(team, keys[0].keyring), tmp_path / "cache")
    msg = str(e.value)
    assert "extra/binary-amd64/Packages.xz of suite stable" in msg
    assert "does not match InRelease" in msg and "deleted" in msg


def test_tampered_deb_is_refused(
    team: str, keys: tuple[Key, Key], debs: dict[str, bytes], tmp_path: Path
) -> None:
    image = kernel_pkgs(debs)[1]
    (tmp_path / "www/team" / image.filename).write_bytes(debs["old"])
    with pytest.raises(VerificationError) as e:
        resolve_and_fetch(team_matrix(team, keys[0].keyring), tmp_path / "cache")
    msg = str(e.value)
    assert f"linux-image-{RELEASE} 9.9.1-1 from {team}/team/{image.filename}" in msg
    assert "does not match the stable Packages index" in msg
    assert not list((tmp_path / "cache" / "debs").iterdir())


def test_missing_suite_of_own_archive_is_a_user_error(
    team: str, keys: tuple[Key, Key], tmp_path: Path
) -> None:
    matrix = team_matrix(team, keys[0].keyring, ", suites: [oldstable]")
    with pytest.raises(UserError, match="suite oldstable does not exist on mirror"):
        resolve_and_fetch(matrix, tmp_path / "cache")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_archive_fails_only_its_cell(
    team: str, keys: tuple[Key, Key], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = f"http://127.0.0.1:{_closed_port()}/gone"
    matrix = parse_matrix(
        f"""
mirror: {team}/debian
archives:
  team: {{url: {team}/team, keyring: {keys[0].keyring}, suites: [stable],
          components: [extra]}}
  down: {{url: {down}, keyring: {keys[0].keyring}, suites: [stable]}}
kernels:
  - {{name: up, archive: team, package: linux-image-team-amd64}}
  - {{name: away, archive: down, package: linux-image-team-amd64}}
"""
    )
    monkeypatch.setenv("KMATRIX_CACHE", str(tmp_path / "cache"))
    resolver = Resolver(matrix, tmp_path / "cache")
    log = io.StringIO()
    progress = Progress(log, live=False)
    sources = runner.kernel_sources(matrix.kernels, resolver, tmp_path / "cache", progress.log)
    assert sources["up"].resolved.primary.version == "9.9.1-1"  # type: ignore[union-attr]
    exc = sources["away"]
    assert isinstance(exc, InfraError)
    cell = pool.unresolved_cell(matrix.kernels[1], exc)
    assert cell["status"] == "error"
    assert f"{down}/dists/stable/InRelease" in cell["reason"]
    assert "set `url:` of archive down in matrix.yaml to change it" in cell["reason"]
    assert "away: down/linux-image-team-amd64 cannot be resolved" in log.getvalue()


def test_debian_release_spans_its_two_archives(
    tmp_path: Path, keys: tuple[Key, Key], debs: dict[str, bytes]
) -> None:
    """suite: R is R (main archive) + R-security (security archive); R-updates may be absent."""
    old = Pkg("linux-image-team-amd64", "9.9.0-1", debs["meta"], "linux-image-9.9.0-0-team-amd64")
    www = tmp_path / "www"
    LocalArchive(www / "debian", keys[0]).publish(
        "release", {"main": [old, Pkg("linux-image-9.9.0-0-team-amd64", "9.9.0-1", debs["old"])]}
    )
    LocalArchive(www / "debian-security", keys[0]).publish(
        "release-security", {"main": kernel_pkgs(debs)}
    )
    with serve(www) as url:
        base = f"mirror: {url}/debian\nkeyring: {keys[0].keyring}\n"
        # No security_mirror: it is found next to the main mirror, as on Debian's own hosts.
        one = "kernels:\n  - {name: k, suite: release, package: linux-image-team-amd64}\n"
        matrix = parse_matrix(base + one)
        resolver = Resolver(matrix, tmp_path / "cache")
        res = resolver.resolve(matrix.kernels[0])
        assert (res.primary.version, res.primary.suite) == ("9.9.1-1", "release-security")
        assert res.provenance()["archive"] == "debian-security"
        assert "archive_url" not in res.provenance()  # the host's mirror stays out of results
        assert res.skipped == ("debian:release-updates",)
        assert (
            prepare_debian(
                resolver.main_archive("amd64"), matrix.kernels[0], res, tmp_path / "cache"
            ).vmlinuz.read_bytes()
            == b"bzImage of 9.9.1"
        )
        # suites: pins exactly the listed ones; the pinned version is then stale.
        pinned = one.replace("suite: release,", "suites: [release], version: 9.9.0-1,")
        matrix = parse_matrix(base + pinned)
        res = Resolver(matrix, tmp_path / "cache").resolve(matrix.kernels[0])
        assert (res.primary.version, res.primary.suite) == ("9.9.0-1", "release")
        assert res.stale_pin is None  # the pinned suite offers nothing newer
        both = one.replace("suite: release,", "suite: release, version: 9.9.0-1,")
        matrix = parse_matrix(base + both)
        res = Resolver(matrix, tmp_path / "cache").resolve(matrix.kernels[0])
        assert res.primary.version == "9.9.0-1"
        assert res.stale_pin == {"pinned": "9.9.0-1", "newest": "9.9.1-1",
                                 "package": "linux-image-team-amd64",
                                 "suite": "release-security"}  # fmt: skip


def test_inline_archive_and_armored_keyring(
    team: str, keys: tuple[Key, Key], tmp_path: Path
) -> None:
    inline = (
        f"mirror: {team}/debian\nkernels:\n"
        f"  - {{name: k, package: linux-image-team-amd64, suite: stable,\n"
        f"     archive: {{url: {team}/team, keyring: {keys[0].keyring}, components: [extra]}}}}\n"
    )
    matrix = parse_matrix(inline)
    res = Resolver(matrix, tmp_path / "cache").resolve(matrix.kernels[0])
    assert res.provenance()["archive"] == f"{team}/team"
    assert res.provenance()["archive_url"] == f"{team}/team"
    armored = tmp_path / "team.asc"
    armored.write_bytes(
        subprocess.run(
            ["gpg", "--export", "--armor"],
            env={**os.environ, "GNUPGHOME": str(keys[0].home)},
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
    )
    with pytest.raises(UserError) as e:
        parse_matrix(inline.replace(str(keys[0].keyring), str(armored)))
    assert f"keyring: {armored} is ASCII-armored" in str(e.value)
    assert f"gpg --dearmor < {armored} > {tmp_path / 'team.gpg'}" in str(e.value)
