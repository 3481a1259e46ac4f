"""Expectations: parsing (errors name the bad expectation), evaluation on recorded results,
JUnit output and the exit-code contract of `invoke check`."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from kmatrix.config import load_matrix, parse_matrix
from kmatrix.errors import ExpectationFailed, UserError
from kmatrix.gate.check import check_file, enforce, gate_run, junit_xml
from kmatrix.gate.expectations import (
    ExpectationSyntaxError,
    evaluate,
    evaluate_cell,
    parse_expectation,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "results" / "partial-5.10-6.1.json"
MIB = 1024 * 1024


def results() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


def cell(data: dict[str, Any], cid: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in data["cells"] if c["id"] == cid)
    return found


def test_parse_full_form() -> None:
    e = parse_expectation("memfd-write VmRSS < 1 MiB on >= 5.10 and < 6.3")
    assert (e.scenario, e.kind, e.subject, e.op, e.value) == (
        "memfd-write",
        "metric",
        "VmRSS_delta",
        "<",
        MIB,
    )
    assert e.bounds == ((">=", (5, 10, 0)), ("<", (6, 3, 0)))
    assert parse_expectation("memfd-write cgroup_shmem_delta >= 90%").percent
    assert parse_expectation("memfd-write oom_score_delta<5").value == 5
    victim = parse_expectation("oom-global-memfd-unmapped first victim == hog on 6.1, unstable")
    assert (victim.kind, victim.value, victim.cells) == ("victim", "hog", ("6.1", "unstable"))
    assert parse_expectation("oom-no-killable panic == yes").value is True
    assert parse_expectation("tmpfile-over-shm-limit errno == ENOSPC on all kernels").value == (
        "ENOSPC"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memfd-write", "expected 'SCENARIO METRIC OP VALUE [on RANGE]'"),
        ("memfd-wrte VmRSS < 1 MiB", "unknown scenario 'memfd-wrte'; did you mean 'memfd-write'?"),
        ("memfd-write VmRS < 1 MiB", "unknown metric 'VmRS'; did you mean 'VmRSS_delta'?"),
        ("memfd-write VmRSS < 1 MB", "unknown unit 'MB'; use B, KiB, MiB, GiB or %"),
        ("memfd-write VmRSS < lots", "value 'lots' is not a number"),
        ("memfd-write oom_score < 5 MiB", "oom_score is in points"),
        ("memfd-write errno < ENOSPC", "errno can only be compared with == or !="),
        ("memfd-write errno == nospace", "use an errno name such as ENOSPC, or none"),
        ("oom-no-killable VmRSS < 1 MiB", "OOM experiment: check 'first victim' or 'panic'"),
        ("oom-global-memfd-mapped first victim == hogg", "did you mean 'hog'?"),
        ("oom-no-killable panic == maybe", "use true or false"),
        ("memfd-write VmRSS < 1 MiB on >= 6.x", "write bounds like '>= 6.1'"),
        ("memfd-write VmRSS < 1 MiB on 6.1 !", "cell names separated by commas"),
    ],
)
def test_parse_errors_name_the_expectation(text: str, message: str) -> None:
    with pytest.raises(ExpectationSyntaxError) as exc:
        parse_expectation(text)
    assert str(exc.value).startswith(f"expectation {text!r}: ")
    assert message in str(exc.value)


def test_matrix_error_names_the_position_and_expectation() -> None:
    text = (
        "kernels: [{name: a, suite: b, package: c}]\n"
        "expectations:\n  - memfd-write VmRSS < 1 MiB\n  - memfd-write VmRSS < 1 MB\n"
    )
    with pytest.raises(UserError) as exc:
        parse_matrix(text, "m.yaml")
    assert str(exc.value) == (
        "m.yaml: expectations[1]: expectation 'memfd-write VmRSS < 1 MB': unknown unit 'MB'; "
        "use B, KiB, MiB, GiB or % (of the scenario's size)"
    )


@pytest.mark.parametrize(
    "path",
    [ROOT / "reports" / "latest" / "results.json", FIXTURE.parent / "host-docker.json"],
    ids=["reports-latest", "host-docker"],
)
def test_default_matrix_expectations_hold_on_recorded_results(path: Path) -> None:
    # The shipped expectations state what the committed full run of the default matrix shows.
    matrix = load_matrix(ROOT / "matrix.yaml")
    assert matrix.expectations
    recorded = json.loads(path.read_text())
    ran = [c["id"] for c in recorded["cells"]]  # a partial run: the cells it holds
    assert "0 failed" in enforce(matrix.expectations, recorded, ran=ran)


def test_metric_failure_reports_kernel_observed_and_expected() -> None:
    data = results()
    sc = next(s for s in cell(data, "6.1")["scenarios"] if s["name"] == "memfd-write")
    sc["metrics"]["VmRSS_delta"] += 512 * MIB
    with pytest.raises(ExpectationFailed) as exc:
        enforce(["memfd-write VmRSS_delta < 1 MiB on all kernels"], data)
    assert exc.value.exit_code == 1
    assert (
        "memfd-write VmRSS_delta < 1 MiB on all kernels: cell 6.1 observed 512.3 MiB, "
        "expected < 1.0 MiB"
    ) in str(exc.value)
    assert "cell 5.10" not in str(exc.value)


def test_version_range_and_cell_names_select_cells() -> None:
    data = results()
    e = parse_expectation("memfd-noexec-seal errno == none on >= 6.3")
    assert {evaluate_cell(e, c).result for c in data["cells"]} == {"skip"}
    e = parse_expectation("memfd-noexec-seal errno == EINVAL on < 6.3")
    assert [evaluate_cell(e, c).result for c in data["cells"]] == ["pass", "pass"]
    e = parse_expectation("memfd-noexec-seal errno == none on 5.10")
    assert [evaluate_cell(e, c).result for c in data["cells"]] == ["fail", "skip"]


def test_percent_of_scenario_size() -> None:
    data = results()
    ok = parse_expectation("memfd-write meminfo_Shmem_delta >= 99%")
    too_much = parse_expectation("memfd-write meminfo_Shmem_delta >= 101%")
    assert evaluate_cell(ok, cell(data, "6.1")).result == "pass"
    outcome = evaluate_cell(too_much, cell(data, "6.1"))
    assert outcome.result == "fail" and "99% of 64.0 MiB" in outcome.observed


def test_cells_that_did_not_run() -> None:
    e = parse_expectation("memfd-write VmRSS < 1 MiB")
    timeout = evaluate_cell(e, {"id": "x", "status": "timeout", "reason": "hung", "kernel": {}})
    assert timeout.result == "fail" and "cell did not run: timeout hung" in timeout.why
    skipped = evaluate_cell(e, {"id": "h", "status": "skipped", "reason": "no docker engine"})
    assert skipped.result == "skip"
    missing = evaluate_cell(e, {"id": "y", "status": "ok", "scenarios": []})
    assert missing.result == "fail" and "was not measured" in missing.why


def test_oom_expectations() -> None:
    data = results()
    c = copy.deepcopy(cell(data, "6.1"))
    victim = parse_expectation("oom-global-memfd-unmapped first victim == hog")
    panic = parse_expectation("oom-no-killable panic == true")
    assert evaluate_cell(victim, c).why == "oom-global-memfd-unmapped was not run in this cell"
    c["oom"] = [
        {"name": "oom-global-memfd-unmapped", "victims": [["hog"], ["hog", "holder"], ["holder"]]},
        {"name": "oom-no-killable", "victims": [[]], "panic": True},
    ]
    outcome = evaluate_cell(victim, c)
    assert outcome.result == "fail" and outcome.observed == "first victims hog, hog, holder"
    assert evaluate_cell(panic, c).result == "pass"
    never_bystander = parse_expectation("oom-global-memfd-unmapped first victim != bystander")
    assert evaluate_cell(never_bystander, c).result == "pass"
    c["oom"][1]["panic"] = None  # refused experiments record null: not measured
    assert evaluate_cell(panic, c).why == "panic not recorded"
    c["oom"][1].update(status="refused", reason="docker shares the host kernel")
    assert evaluate_cell(panic, c).result == "skip"
    c["oom"][1].update(status="error", reason="probe exited 1")
    assert evaluate_cell(panic, c).why == "experiment error: probe exited 1"


def test_junit_has_one_testcase_per_expectation_and_cell() -> None:
    exps = [
        parse_expectation(t) for t in ("memfd-write VmRSS < 1 KiB", "memfd-write VmRSS < 1 MiB")
    ]
    root = ET.fromstring(junit_xml(evaluate(exps, results())))
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == 4
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["memfd-write VmRSS < 1 KiB [6.1]"]
    assert root.find("testsuite").get("failures") == "1"  # type: ignore[union-attr]


def test_check_file_exit_codes(tmp_path: Path) -> None:
    matrix = tmp_path / "m.yaml"
    matrix.write_text(
        "kernels: [{name: a, suite: b, package: c}]\nexpectations: ['memfd-write VmRSS < 1 MiB']\n"
    )
    junit = tmp_path / "out.xml"
    assert "1 expectation(s) hold on 2 cell(s)" in check_file(FIXTURE, matrix, junit)
    assert junit.read_text().count("<testcase") == 2
    matrix.write_text(
        "kernels: [{name: a, suite: b, package: c}]\nexpectations: ['memfd-write VmRSS < 1 B']\n"
    )
    with pytest.raises(ExpectationFailed) as failed:
        check_file(FIXTURE, matrix, junit)
    assert failed.value.exit_code == 1
    assert "<failure" in junit.read_text()  # written before the failure is raised
    with pytest.raises(UserError) as unreadable:
        check_file(tmp_path / "missing.json", matrix)
    assert unreadable.value.exit_code == 2


def test_the_end_of_a_run_checks_the_expectations_it_started_with(tmp_path: Path) -> None:
    """`invoke matrix` gates on the expectation lines the run recorded at its start: an
    edit of the matrix file during the run (here one that no longer even loads) changes
    neither the verdict nor the exit code; results without them read the file."""
    matrix = tmp_path / "m.yaml"
    matrix.write_text("kernels: [{name: a, suite: b, package: c}]\nguest: {typo: 1}\n")
    data = results()
    data["run"]["expectations"] = ["memfd-write VmRSS < 1 MiB"]
    assert "1 expectation(s) hold on 2 cell(s)" in gate_run(data, matrix)  # type: ignore[arg-type]
    data["run"]["expectations"] = ["memfd-write VmRSS < 1 B"]
    with pytest.raises(ExpectationFailed):
        gate_run(data, matrix)  # type: ignore[arg-type]
    del data["run"]["expectations"]
    with pytest.raises(UserError) as unreadable:
        gate_run(data, matrix)  # type: ignore[arg-type]
    assert "typo" in str(unreadable.value)
