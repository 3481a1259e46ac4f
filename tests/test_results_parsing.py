"""Parsing what a real guest sent back: the result channel and the console log.

Fixtures are recorded from real boots of Debian's 6.1 cloud kernel under QEMU/TCG.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kmatrix.backends.qemu import QemuRun
from kmatrix.cells.console import analyze_console
from kmatrix.cells.qemu import classify
from kmatrix.results.schema import ProbeOutput, parse_probe_output

FIXTURES = Path(__file__).parent / "fixtures" / "guest"
RESULTS_LOG = (FIXTURES / "6.1-results.log").read_text()
CONSOLE_LOG = (FIXTURES / "6.1-console.log").read_text()
PANIC_LOG = (FIXTURES / "6.1-panic-no-root-console.log").read_text()

OK_RUN = QemuRun(returncode=0, timed_out=False, duration_s=30.0, stderr="")


def test_recorded_probe_output_is_complete() -> None:
    out = parse_probe_output(RESULTS_LOG.splitlines())
    assert out.complete, out.problems
    assert out.hello is not None and out.hello["release"] == "6.1.0-50-cloud-amd64"
    names = [s["name"] for s in out.scenarios]
    assert names[:3] == ["anon-private", "anon-shared", "memfd-write"]
    assert len(names) == 15
    memfd = next(s for s in out.scenarios if s["name"] == "memfd-write")
    assert memfd["metrics"]["VmRSS_delta"] < 1 << 20
    assert memfd["metrics"]["meminfo_Shmem_delta"] > 60 << 20


def test_truncated_output_is_never_complete() -> None:
    cut = RESULTS_LOG[: len(RESULTS_LOG) // 2]
    out = parse_probe_output(cut.splitlines())
    assert not out.complete
    assert out.done is None
    # A record cut mid-line is reported as garbled, not half-parsed.
    assert out.problems and "garbled" in out.problems[0]


def test_interleaved_garbage_is_a_problem_not_a_number() -> None:
    lines = RESULTS_LOG.splitlines()
    idx = next(i for i, line in enumerate(lines) if '"memfd-mmap"' in line)
    lines[idx] = lines[idx][:40] + "[   12.3] random kernel noise" + lines[idx][40:]
    out = parse_probe_output(lines)
    assert not out.complete
    assert len(out.scenarios) == 14


def test_non_integer_metric_is_rejected() -> None:
    lines = RESULTS_LOG.splitlines()
    idx = next(i for i, line in enumerate(lines) if '"memfd-write"' in line)
    lines[idx] = lines[idx].replace('"VmRSS_delta":', '"VmRSS_delta":"12"+', 1)
    lines[idx] = lines[idx].replace('"12"+', '"12",', 1)
    out = parse_probe_output(lines)
    assert any("non-integer" in p or "garbled" in p for p in out.problems)


def test_lost_records_are_detected() -> None:
    lines = [line for line in RESULTS_LOG.splitlines() if '"memfd-mmap"' not in line]
    out = parse_probe_output(lines)
    assert not out.complete
    assert "probe said it ran 15 scenarios, 14 arrived" in out.problems


def test_noise_lines_and_crlf_are_ignored() -> None:
    lines = ["random noise", *(line + "\r" for line in RESULTS_LOG.splitlines())]
    assert parse_probe_output(lines).complete


def test_console_of_a_good_boot() -> None:
    summary = analyze_console(CONSOLE_LOG)
    assert summary.release == "6.1.0-50-cloud-amd64"
    assert summary.panic is None
    assert summary.init_marks[0].startswith("mounts")
    assert summary.init_marks[-1] == "probe exit 0"


def test_console_of_a_panic() -> None:
    summary = analyze_console(PANIC_LOG)
    assert summary.panic == "VFS: Unable to mount root fs on unknown-block(0,0)"
    assert not summary.reached_init
    assert len(summary.tail) == 40


@pytest.mark.parametrize(
    ("run", "console", "results", "status"),
    [
        (OK_RUN, CONSOLE_LOG, RESULTS_LOG, "ok"),
        (OK_RUN, PANIC_LOG, "", "panic"),
        (QemuRun(None, True, 900.0, ""), CONSOLE_LOG, RESULTS_LOG[:3000], "timeout"),
        (QemuRun(1, False, 1.0, "qemu: could not load kernel"), "", "", "error"),
        (OK_RUN, CONSOLE_LOG, RESULTS_LOG[:3000], "error"),
    ],
)
def test_classify(run: QemuRun, console: str, results: str, status: str) -> None:
    got, reason = classify(run, analyze_console(console), parse_probe_output(results.splitlines()))
    assert got == status
    assert (reason == "") == (status == "ok")


def test_timeout_reason_names_the_last_init_step() -> None:
    run = QemuRun(None, True, 900.0, "")
    _, reason = classify(run, analyze_console(CONSOLE_LOG[:100]), ProbeOutput())
    assert "before init started" in reason
