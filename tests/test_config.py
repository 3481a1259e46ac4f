"""matrix.yaml validation: every bad input stops with one message naming file, field and fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kmatrix.config import (
    DebianKernel,
    DockerKernel,
    LocalKernel,
    load_matrix,
    parse_matrix,
    parse_size,
)
from kmatrix.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GOOD_KERNEL = "{name: a, suite: bookworm, package: linux-image-cloud-amd64}"


def test_default_matrix_is_valid() -> None:
    m = load_matrix(ROOT / "matrix.yaml")
    assert [k.name for k in m.kernels][:5] == ["5.10", "6.1", "6.12", "unstable", "7.3-rc"]
    assert {k.backend for k in m.kernels} == {"qemu", "docker"}
    assert m.guest.memory == 448 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "kernels: [{name: a, suite: x, pakage: y}]",
            "kernels[0].pakage: unknown key; did you mean 'package'?",
        ),
        (
            "kernels: [{name: a, suite: x, package: y}, {name: a, suite: x, package: z}]",
            "kernels[1].name: duplicate kernel name 'a'",
        ),
        (
            f"guest: {{memory: lots}}\nkernels: [{GOOD_KERNEL}]",
            "guest.memory: expected a size such as 512M",
        ),
        ("kernels: [{name: a}]", "kernels[0]: a qemu kernel needs suite: and package:"),
        ("kernels: []", "kernels: the list is empty"),
        ("kernels: [{name: 1, suite: x, package: y}]", "kernels[0].name"),
        (f"accel: fast\nkernels: [{GOOD_KERNEL}]", "accel: Input should be 'auto', 'tcg' or 'kvm'"),
        (
            f"guest: {{tcg_thread: 2}}\nkernels: [{GOOD_KERNEL}]",
            "guest.tcg_thread: Input should be 'single' or 'multi'",
        ),
        ("kernels: [{name: a, suite: x, package: y, path: /k}]", "either path:"),
        (
            "kernels: [{name: host, backend: docker, suite: sid}]",
            "docker cell runs the host kernel",
        ),
        ("- just a list", "expected a mapping"),
        ("kernels: [", "not valid YAML"),
        ("guest: {}", "kernels: required field is missing"),
        ("kernels: [{name: 'a b', suite: x, package: y}]", "name 'a b' must start"),
    ],
)
def test_bad_matrix_names_the_field(text: str, expected: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_matrix(text, "m.yaml")
    assert str(exc.value).startswith("m.yaml: ")
    assert expected in str(exc.value)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read the matrix file"):
        load_matrix(tmp_path / "nope.yaml")


def test_select_unknown_kernel() -> None:
    m = parse_matrix(f"kernels: [{GOOD_KERNEL}]")
    with pytest.raises(UserError, match=r"unknown kernel.*matrix\.yaml has: a"):
        m.select(["b"])
    assert [k.name for k in m.select(["a"])] == ["a"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("512M", 512 << 20), ("64MiB", 64 << 20), ("1G", 1 << 30), ("4k", 4096), (123, 123)],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["12X", "", True, 1.5, "M"])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


BAD = sorted((Path(__file__).parent / "fixtures" / "bad-matrix").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_matrix_files_give_their_one_line_message(path: Path) -> None:
    text = path.read_text()
    expected = text.splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(UserError) as exc:
        parse_matrix(text, "bad.yaml")
    assert str(exc.value) == expected
    assert "\n" not in str(exc.value)


def test_loading_a_matrix_imports_no_parser_or_runner() -> None:
    # Names come from kmatrix.catalog; the kernel-log parser, cells and runs are not needed
    # to read a matrix file (a fresh interpreter: this one has imported everything already).
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); import kmatrix.config; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('kmatrix'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert "kmatrix.config" in loaded
    for module in ("kmatrix.results.oomlog", "kmatrix.results.oom", "kmatrix.cells", "kmatrix.run"):
        assert module not in loaded, loaded


def test_each_kernel_entry_is_its_own_kind() -> None:
    m = load_matrix(ROOT / "matrix.yaml")
    kinds = {type(k) for k in m.kernels}
    assert kinds == {DebianKernel, DockerKernel}
    text = (
        "kernels:\n"
        "  - {name: a, suite: bookworm, package: linux-image-cloud-amd64, path: null}\n"
        "  - {name: b, path: /k, backend: qemu, suite: null}\n"
        "  - {name: c, backend: docker, memory: 256M, package: null}\n"
    )
    a, b, c = parse_matrix(text).kernels
    assert isinstance(a, DebianKernel) and a.package == "linux-image-cloud-amd64"
    assert isinstance(b, LocalKernel) and b.path == Path("/k") and b.backend == "qemu"
    assert isinstance(c, DockerKernel) and c.memory == 256 * 1024 * 1024
    assert [k.source for k in (a, b, c)] == [
        "bookworm/linux-image-cloud-amd64", "local build /k", "host kernel (docker)"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        # Keys of another kind say why they do not belong, instead of "unknown key".
        ("{name: h, backend: docker, memory: 512M, modules: /m}", "kernels[0].modules: a docker"),
        ("{name: h, backend: docker, memory: 512M, cmdline: x}", "kernels[0].cmdline: a docker"),
        ("{name: a, suite: x, package: y, config: /c}", "config: only for a local build"),
        ("{name: a, path: /k, version: '1'}", "kernels[0]: give either path:"),
        ("{name: a, path: /k, pids_limit: 64}", "kernels[0].pids_limit: only for backend: docker"),
        ("{name: a, backend: vm, suite: x, package: y}", "kernels[0].backend: Input should be"),
        ("just-a-name", "kernels[0]: a kernel entry is a mapping such as"),
        ("{name: h, backend: docker, memory: 512M, pids_limt: 64}", "did you mean 'pids_limit'?"),
    ],
)
def test_kernel_entries_refuse_what_their_kind_cannot_use(entry: str, expected: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_matrix(f"kernels:\n  - {entry}\n", "m.yaml")
    assert expected in str(exc.value)
