"""The fault suite: bad inputs given to the real `invoke` command line, one row each.

Every row is run as a user would run it (``invoke TASK ...`` in a fresh process) and must
end with its exit code (2: kmatrix could not run, 1: an expectation failed), a message
containing its fragment, and no Python traceback. Every matrix row is refused when the
matrix loads, before any download or boot (the cache is a fresh empty directory, and a
row that got further would need the network and minutes, failing its time limit).
Process-level faults (kill -9, disk full, concurrent runs, corrupted cache, QEMU that
cannot start) are in tests/test_faults_process.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from invoke.collection import Collection
from invoke.program import Program

ROOT = Path(__file__).resolve().parents[1]
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402  (tasks.py is at the project root, not in a package)

GOOD = """\
check_valid_until: false
guest: {suite: bookworm, memory: 256M, shm_size: 32M, disk_size: 64M}
probe: {size: 8M, scenarios: [memfd-write], cell_timeout: 120}
oom: {experiments: []}
kernels:
  - {name: "6.1", suite: bookworm, package: linux-image-cloud-amd64}
"""


def _m(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


def _exp(line: str) -> str:
    return GOOD + f"expectations:\n  - {line}\n"


#: Recorded real results (not reports/latest, which a user's own `invoke matrix` rewrites).
RESULTS_FILE = ROOT / "tests" / "fixtures" / "results" / "full-5-kernels.json"
RESULTS = json.loads(RESULTS_FILE.read_text())
RESULTS_WITH_OOM = json.loads(
    (ROOT / "tests" / "fixtures" / "results" / "memfd-pressure-5.10-6.12.json").read_text()
)


def _results(**cell: object) -> str:
    """A valid one-cell results file (a real cell) but for what ``cell`` replaces."""
    return _doc(cells=[RESULTS["cells"][1] | cell])


def _doc(**top: object) -> str:
    """A results document with a real run header; ``top`` replaces (None: drops) keys."""
    doc = {"schema_version": 1, "run": RESULTS["run"] | {"name": "t"}, "cells": []} | top
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def _kills_text() -> str:
    """A real cell with OOM runs whose second repeat's kills are text."""
    cell = next(c for c in RESULTS_WITH_OOM["cells"] if len(c["oom"][0]["runs"]) > 1)
    runs = [*cell["oom"][0]["runs"]]
    runs[1] = runs[1] | {"kills": "none"}
    return _doc(cells=[cell | {"oom": [cell["oom"][0] | {"runs": runs}]}])


def _metric_text() -> str:
    scenario = RESULTS["cells"][1]["scenarios"][0]
    bad = scenario | {"metrics": scenario["metrics"] | {"VmRSS_delta": "big"}}
    return _results(scenarios=[bad])


@dataclass(frozen=True)
class Case:
    """One bad input: files to write, the command, the expected exit code and fragment."""

    id: str
    args: tuple[str, ...]
    code: int
    fragment: str
    files: tuple[tuple[str, str | bytes], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    names_file: bool = False  # the message must name the matrix file given


def matrix(id: str, text: str | bytes, fragment: str, *extra: str) -> Case:
    """`invoke matrix` with a bad matrix file (m.yaml) and optional extra options."""
    args = ("matrix", "--matrix-file", "{tmp}/m.yaml", *extra)
    return Case(id, args, 2, fragment, (("m.yaml", text),), names_file=not extra)


def check(id: str, results: str | bytes, fragment: str, code: int = 2, text: str = GOOD) -> Case:
    """`invoke check` of a results file r.json against matrix m.yaml."""
    args = ("check", "--results", "{tmp}/r.json", "--matrix-file", "{tmp}/m.yaml")
    return Case(id, args, code, fragment, (("r.json", results), ("m.yaml", text)))


# fmt: off
CASES = [
    # --- sizes, timeouts, counts, limits ------------------------------------------------
    matrix("probe-size-zero", _m("size: 8M", "size: 0"), "positive size"),
    matrix("probe-size-negative", _m("size: 8M", "size: -8"), "positive size"),
    matrix("probe-size-not-mib", _m("size: 8M", "size: 1500K"), "multiple of 1M"),
    matrix("probe-size-huge", _m("size: 8M", "size: 1G"), "does not fit a 256M guest"),
    matrix("shm-size-zero", _m("shm_size: 32M", "shm_size: 0"), "positive size"),
    matrix("disk-size-tiny", _m("disk_size: 64M", "disk_size: 1M"), "guest.disk_size: 1M"),
    matrix("guest-memory-1T", _m("memory: 256M", "memory: 1024G"), "guest.memory: 1048576M"),
    matrix("guest-memory-small", _m("memory: 256M", "memory: 64M"), "use 192M to"),
    matrix("size-is-text", _m("size: 8M", "size: lots"), "expected a size"),
    matrix("size-is-bool", _m("size: 8M", "size: true"), "not a boolean"),
    matrix("timeout-zero", _m("cell_timeout: 120", "cell_timeout: 0"), "probe.cell_timeout"),
    matrix("timeout-huge", _m("cell_timeout: 120", "cell_timeout: 999999999"), "out of range"),
    matrix("timeout-float", _m("cell_timeout: 120", "cell_timeout: 1.5"), "cell_timeout"),
    matrix("oom-repeats-zero", _m("oom: {", "oom: {repeats: 0, "), "between 1 and 20"),
    matrix("oom-timeout-negative", _m("oom: {", "oom: {timeout: -5, "), "oom.timeout"),
    matrix("oom-memory-small", _m("oom: {", "oom: {memory: 100M, "), "at least 144M"),
    matrix("pids-limit-small", GOOD + "  - {name: h, backend: docker, memory: 256M, "
           "pids_limit: 10}\n", "at least 16"),
    matrix("docker-memory-tiny", GOOD + "  - {name: h, backend: docker, memory: 1M}\n",
           "kernels[1].memory: 1M is out of range"),
    matrix("docker-shm-over-memory", GOOD + "  - {name: h, backend: docker, memory: 128M, "
           "shm_size: 256M}\n", "shm_size must not exceed memory"),
    matrix("cmdline-newline", _m("linux-image-cloud-amd64}", 'linux-image-cloud-amd64, '
           'cmdline: "a\\nb"}'), "without line breaks"),
    # --- names from the one catalog ----------------------------------------------------
    matrix("scenario-typo", _m("[memfd-write]", "[memfd-wrte]"), "did you mean 'memfd-write'"),
    matrix("scenario-empty", _m("[memfd-write]", "[]"), "scenarios: the list is empty"),
    matrix("scenario-twice", _m("[memfd-write]", "[memfd-write, memfd-write]"), "twice"),
    matrix("experiment-typo", _m("experiments: []", "experiments: [oom-global-memfd-unmaped]"),
           "did you mean 'oom-global-memfd-unmapped'"),
    matrix("experiment-twice", _m("experiments: []", "experiments: [oom-memcg-v2, "
           "oom-memcg-v2]"), "twice"),
    matrix("expect-scenario", _exp("memfd-wirte VmRSS_delta < 1 MiB"), "unknown scenario"),
    matrix("expect-metric", _exp("memfd-write VmRS_delta < 1 MiB"), "unknown metric"),
    matrix("expect-errno", _exp("memfd-write errno == enospc"), "use an errno name"),
    matrix("expect-victim", _exp("oom-global-memfd-mapped first victim == hogg"),
           "did you mean 'hog'"),
    matrix("expect-unknown-cell", _exp("memfd-write VmRSS_delta < 1 MiB on 6.2"),
           "names cell(s) 6.2 that are not in kernels"),
    matrix("expect-bad-range", _exp("memfd-write VmRSS_delta < 1 MiB on >= six"),
           "kernel range"),
    # --- the file itself ---------------------------------------------------------------
    matrix("duplicate-key", GOOD + "guest: {memory: 512M}\n", "duplicate key 'guest'"),
    matrix("duplicate-nested-key", _m("size: 8M,", "size: 8M, size: 16M,"),
           "duplicate key 'size'"),
    matrix("not-utf8", GOOD.encode().replace(b"bookworm", b"book\xffworm", 1), "not UTF-8"),
    matrix("not-yaml", "kernels: [\n", "not valid YAML"),
    matrix("not-a-mapping", "- just a list\n", "expected a mapping"),
    matrix("unknown-key", _m("probe: {", "probe: {sise: 8M, "), "unknown key"),
    matrix("duplicate-kernel", GOOD + GOOD.splitlines(keepends=True)[-1], "duplicate kernel"),
    matrix("local-path-missing", GOOD + "  - {name: mine, path: /nonexistent/bzImage}\n",
           "kernels[mine].path: /nonexistent/bzImage is not a file"),
    Case("matrix-file-missing", ("matrix", "--matrix-file", "{tmp}/none.yaml"), 2,
         "cannot read the matrix file"),
    Case("matrix-file-is-dir", ("matrix", "--matrix-file", "{tmp}"), 2, "Is a directory"),
    # --- command-line options ----------------------------------------------------------
    matrix("name-dotdot", GOOD, "use a plain name", "--name", ".."),
    matrix("name-parent", GOOD, "use a plain name", "--name", "../elsewhere"),
    matrix("name-absolute", GOOD, "use a plain name", "--name", "/tmp/abs"),
    matrix("name-nested", GOOD, "use a plain name", "--name", "a/b"),
    matrix("jobs-negative", GOOD, "--jobs -1", "--jobs", "-1"),
    matrix("jobs-huge", GOOD, "--jobs 1000", "--jobs", "1000"),
    matrix("kernels-unknown", GOOD, "--kernels: unknown kernel(s) 9.9", "--kernels", "9.9"),
    matrix("kernels-twice", GOOD, "named twice", "--kernels", "6.1,6.1"),
    Case("accel-unknown", ("cell", "--kernel", "6.1", "--output", "{tmp}/o.json",
         "--matrix-file", "{tmp}/m.yaml", "--accel", "fast"), 2, "--accel 'fast'",
         (("m.yaml", GOOD),)),
    Case("report-name-parent", ("report", "--results", str(RESULTS_FILE),
         "--name", "../x"), 2, "report name '../x'"),
    Case("merge-name-abs", ("merge", "--files", "{tmp}/r.json", "--name", "/abs"), 2,
         "--name '/abs'", (("r.json", _results()),)),
    Case("cache-is-a-file", ("matrix", "--matrix-file", "{tmp}/m.yaml", "--name", "t"), 2,
         "is not a directory; set KMATRIX_CACHE", (("m.yaml", GOOD), ("cachefile", "x")),
         (("KMATRIX_CACHE", "{tmp}/cachefile"),)),
    # --- results files -----------------------------------------------------------------
    Case("results-is-dir", ("check", "--results", "{tmp}"), 2, "Is a directory"),
    check("results-missing-file", "", "cannot read results (No such file"),
    check("results-not-utf8", b"\xff\xfe{}", "not UTF-8"),
    check("results-truncated", _results()[:500], "not valid JSON"),
    check("results-wrong-schema", '{"schema_version": 7}', "schema_version 1"),
    check("results-cells-not-list", _doc(cells={}), "cells must be a list (found {})"),
    check("results-bad-status", _results(status="great"), "status must be one of"),
    check("results-cell-no-id", _results(id=""), "cells[0].id must be a non-empty string"),
    check("results-metric-text", _metric_text(),
          "cells[0].scenarios[0].metrics.VmRSS_delta must be an integer (found \"big\")"),
    check("results-no-cells", _doc(), "has no cells"),
    Case("results-nested-type", ("report", "--results", "{tmp}/r.json"), 2,
         "cells[0].oom[0].runs[1].kills must be a list (found \"none\"); regenerate it with "
         "`invoke matrix`", (("r.json", _kills_text()),)),
    Case("diff-wrong-shape", ("diff", "--base", "{tmp}/r.json", "--new", "{tmp}/r.json"), 2,
         "run is missing", (("r.json", _doc(run=None)),)),
    Case("report-not-utf8", ("report", "--results", "{tmp}/r.json"), 2, "not UTF-8",
         (("r.json", b"\xff"),)),
    Case("junit-is-dir", ("check", "--results", "{tmp}/r.json", "--matrix-file", "{tmp}/m.yaml",
         "--junit", "{tmp}"), 2, "--junit", (("r.json", _results()), ("m.yaml", GOOD))),
    # --- gates that cannot pass vacuously (exit 1) -----------------------------------------
    check("victim-ne-nothing-ran",
          _results(oom=[{"name": "oom-global-memfd-mapped", "status": "ok", "reason": None,
                         "repeats": 0, "runs": [], "victims": [], "panic": False,
                         "first_victim": []}]),
          "not evaluated", 1, _exp("oom-global-memfd-mapped first victim != hog")),
    check("named-cell-missing", _results(),
          "cell not in the results", 1, GOOD +
          "  - {name: other, suite: bookworm, package: linux-image-cloud-amd64}\n" +
          "expectations:\n  - memfd-write VmRSS_delta < 1 MiB on other\n"),
    check("named-cell-skipped", _results(status="skipped", reason="no engine"),
          "not evaluated", 1, _exp("memfd-write VmRSS_delta < 1 MiB on 6.1")),
]
# fmt: on


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def _write_files(case: Case, tmp: Path) -> None:
    for name, content in case.files:
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content:
            path.write_text(content)


def _invoke_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run tasks.py's command line in this process (as the `invoke` script does).

    Any exception other than invoke's own exit propagates and fails the test: that is
    the traceback a user would have seen.
    """
    program = Program(namespace=Collection.from_module(tasks), binary="invoke")
    code = 0
    try:
        program.run(["invoke", *args], exit=True)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + "\n--stderr--\n" + captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_clear_line(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_files(case, tmp_path)
    monkeypatch.setenv("KMATRIX_CACHE", str(tmp_path / "cache"))
    for key, value in case.env:
        monkeypatch.setenv(key, _fill(value, tmp_path))
    code, out = _invoke_in_process([_fill(a, tmp_path) for a in case.args], capsys)
    assert "Traceback" not in out, out
    assert code == case.code, out
    assert case.fragment in out, out
    if case.code == 2:
        err = out.split("--stderr--", 1)[1]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("kmatrix: "), out
    if case.names_file:  # matrix-file errors name the file actually given, not matrix.yaml
        assert str(tmp_path / "m.yaml") in out, out
    assert not (tmp_path / "cache" / "debs").exists(), "a bad input must not download"


#: A few rows again through the real `invoke` script in a fresh process: what the user runs.
SUBPROCESS_ROWS = ("not-utf8", "name-parent", "results-cells-not-list", "victim-ne-nothing-ran")


@pytest.mark.parametrize("row", SUBPROCESS_ROWS)
def test_bad_input_through_the_real_command(row: str, tmp_path: Path) -> None:
    (case,) = [c for c in CASES if c.id == row]
    _write_files(case, tmp_path)
    env = os.environ | {"KMATRIX_CACHE": str(tmp_path / "cache")}
    args = [_fill(a, tmp_path) for a in case.args]
    run = subprocess.run(
        [*INVOKE, *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    out = run.stdout + run.stderr
    assert "Traceback" not in out and run.returncode == case.code and case.fragment in out, out


def test_the_suite_has_at_least_forty_rows() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
