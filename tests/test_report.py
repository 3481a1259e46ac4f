"""Rendering report.md from recorded real results: golden files, Findings, charts, provenance.

Golden files live in tests/golden/, and the committed reports (reports/latest/, ...) are
golden files of their own results.json. After an intended change to the report, regenerate
them with ``KMATRIX_UPDATE_GOLDEN=1 pytest tests/test_report.py``: every golden test then
rewrites its file and fails, so a variable left set can never hide a change. Review the diff
and run again without it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from kmatrix.errors import UserError
from kmatrix.report.charts import planned_charts, write_charts
from kmatrix.report.dirs import check_report_name
from kmatrix.report.findings import DISAGREE_MARK, Answer, answer_all
from kmatrix.report.findings_chart import answer_fill, short_answer
from kmatrix.report.markdown import render_report, report_from_file, write_report

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "results"
GOLDEN = HERE / "golden"
RECORDED = sorted(p.name for p in FIXTURES.glob("*.json"))
#: Committed report directories whose report.md must be what `invoke report` renders from
#: their results.json. A real run rewrites them with the same renderer, so the test holds
#: for whatever results they carry; only a renderer change without re-rendering breaks it.
REPORTS = HERE.parent / "reports"
COMMITTED_REPORTS = ("latest",)
UPDATE_GOLDEN = "KMATRIX_UPDATE_GOLDEN"


def check_golden(golden: Path, text: str) -> None:
    """``text`` must equal ``golden``; under KMATRIX_UPDATE_GOLDEN rewrite it, then fail."""
    if os.environ.get(UPDATE_GOLDEN):
        golden.write_text(text)
        pytest.fail(f"golden file rewritten: review the diff and rerun without {UPDATE_GOLDEN}")
    assert text == golden.read_text(), f"report changed; see module docstring to update {golden}"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def with_oom(results: dict[str, Any]) -> dict[str, Any]:
    """Recorded results plus OOM experiments shaped like the probe's (victims differ by cell)."""
    out = copy.deepcopy(results)
    for i, cell in enumerate(out["cells"]):
        first = "hog" if i == 0 else "holder"
        cell["oom"] = [
            {
                "name": "oom-global-memfd-unmapped",
                "repeats": 3,
                "victims": [[first, "bystander"], [first], ["hog"]],
                "panic": False,
                "kills": [],
                "predicted_victim": "hog",
            },
            {"name": "oom-no-killable", "repeats": 1, "victims": [[]], "panic": True},
        ]
    return out


@pytest.mark.parametrize("name", RECORDED)
def test_report_matches_golden(name: str) -> None:
    check_golden(GOLDEN / name.replace(".json", ".md"), render_report(load(name)))


@pytest.mark.parametrize("name", COMMITTED_REPORTS)
def test_committed_report_is_what_invoke_report_renders(name: str, tmp_path: Path) -> None:
    """`invoke report --results reports/NAME/results.json` (report_from_file) reproduces the
    committed report.md exactly, OOM section included, and the same set of charts.

    The chart files are compared by name only: their bytes depend on matplotlib and the
    fonts it finds (test_charts_are_deterministic_and_stale_ones_removed checks they do not
    change between two renders on one machine).
    """
    committed = REPORTS / name
    if os.environ.get(UPDATE_GOLDEN):
        report_from_file(committed / "results.json")  # rewrites report.md and its charts
        pytest.fail(f"golden file rewritten: review the diff and rerun without {UPDATE_GOLDEN}")
    shutil.copyfile(committed / "results.json", tmp_path / "results.json")
    rendered = report_from_file(tmp_path / "results.json")
    assert rendered.read_text() == (committed / "report.md").read_text(), (
        f"{committed}/report.md is not what the renderer makes of its results.json; "
        f"regenerate it with `invoke report --results {committed}/results.json` (or "
        f"{UPDATE_GOLDEN}=1, see the module docstring) and review the diff"
    )
    charts = sorted(p.name for p in tmp_path.glob("chart-*.svg"))
    assert charts == sorted(p.name for p in committed.glob("chart-*.svg"))


def test_sections_in_order_findings_first() -> None:
    text = render_report(load("partial-5.10-6.1.json"))
    headings = re.findall(r"^## (.+)$", text, re.M)
    # No Charts section: 5.10 and 6.1 agree everywhere, so only the findings picture is drawn.
    assert headings == ["Findings", "Cells", "Accounting", "Provenance"]
    assert text.index("](chart-findings.svg)") < text.index("| question")


def test_kernel_names_are_not_parsed_as_numbers() -> None:
    # tabulate would print the cell "5.10" as 5.1 and 64.0 MiB as 64.
    text = render_report(load("partial-5.10-6.1.json"))
    assert "| 5.10 " in text and "| 5.1 " not in text
    assert re.search(r"\|\s+64\.0 \|", text)


def test_findings_answer_with_numbers() -> None:
    rows = {r.question: r for r in answer_all(load("dev-6.1.json")["cells"])}
    unmapped = rows["unmapped memfd (write()) counted in RSS / oom_score?"].answers[0]
    assert unmapped.text == "no (RSS +0.0 MiB, oom_score +0)"
    assert (
        rows["memfd limited by /dev/shm size?"].answers[0].text
        == "no: wrote 160.0 MiB (size= 128.0)"
    )
    assert (
        rows["O_TMPFILE on /dev/shm limited?"].answers[0].text
        == "yes: ENOSPC at 128.0 MiB (size= 128.0)"
    )
    assert rows["memfd charged to the writer's memory cgroup?"].answers[0].key == "yes"
    assert rows["MFD_NOEXEC_SEAL supported?"].answers[0].text == "no (EINVAL from memfd_create)"


def test_questions_no_cell_measured_are_left_out() -> None:
    """Results from before the OOM experiments: those questions have no row at all."""
    rows = {r.question: r for r in answer_all(load("partial-5.10-6.1.json")["cells"])}
    for q in ("first OOM victim, holder's memfd unmapped", "panic when nothing is killable?"):
        assert q not in rows
    assert "unmapped memfd (write()) counted in RSS / oom_score?" in rows
    with_oom_rows = {
        r.question for r in answer_all(with_oom(load("partial-5.10-6.1.json"))["cells"])
    }
    assert "first OOM victim, holder's memfd unmapped" in with_oom_rows


def test_disagreeing_rows_are_marked_and_first() -> None:
    results = with_oom(load("partial-5.10-6.1.json"))
    rows = answer_all(results["cells"])
    assert rows[0].question == "first OOM victim, holder's memfd unmapped"
    assert rows[0].disagree and not any(r.disagree for r in rows[1:])
    assert [a.text for a in rows[0].answers] == [
        "hog 3/3 (model: hog)",
        "holder 2/3, hog 1/3 (model: hog)",
    ]
    text = render_report(results)
    findings = text.split("## Findings", 1)[1]
    first_row = [line for line in findings.splitlines() if line.startswith("| ")][1]
    assert first_row.startswith(f"| {DISAGREE_MARK} first OOM victim")
    panic = next(r for r in rows if r.question == "panic when nothing is killable?")
    assert [a.text for a in panic.answers] == ["yes", "yes"]


def test_noise_does_not_count_as_disagreement() -> None:
    # 5.10 shows RSS +0.0 MiB and 6.1 +0.3 MiB for memfd-write: both "no".
    rows = answer_all(load("partial-5.10-6.1.json")["cells"])
    assert not any(r.disagree for r in rows)


def test_failed_cell_renders_with_dashes() -> None:
    results = load("partial-5.10-6.1.json")
    results["cells"].append(
        {"id": "7.3-rc", "backend": "qemu", "status": "timeout", "reason": "no init", "kernel": {}}
    )
    text = render_report(results)
    assert "not ok: 7.3-rc (timeout)" in text
    assert "timeout: no init" in text


def test_provenance_has_every_sha256_and_machine_facts() -> None:
    results = load("partial-5.10-6.1.json")
    text = render_report(results).split("## Provenance", 1)[1]
    for cell in results["cells"]:
        assert f"`{cell['kernel']['sha256']}`" in text
    assert f"`{results['run']['probe_sha256']}`" in text
    assert "QEMU 7.2.22" in text and "CONFIG_MEMCG_V1" in text and "/dev/shm size MiB" in text


def test_provenance_shows_the_kernel_command_line_only_where_recorded() -> None:
    results = load("partial-5.10-6.1.json")
    assert "kernel command line" not in render_report(results)  # recorded before the probe had it
    results["cells"][0]["probe"]["cmdline"] = "console=ttyS0,115200 panic=-1 mitigations=off"
    text = render_report(results).split("## Provenance", 1)[1]
    (row,) = [line for line in text.splitlines() if line.startswith("| kernel command line")]
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells == ["`console=ttyS0,115200 panic=-1 mitigations=off`", "—"]


def test_a_knob_row_appears_once_a_cell_recorded_the_knob() -> None:
    """cgroup2_options came with a later probe: no row of dashes for results without it;
    with it, the value where recorded, "absent" where the probe found no cgroup2 mount."""
    results = load("latest-7-cells.json")
    assert "cgroup2 mount options" not in render_report(results)
    first, second, *_ = results["cells"]
    first["probe"]["knobs"]["cgroup2_options"] = "rw,favordynmods"
    second["probe"]["knobs"]["cgroup2_options"] = None
    text = render_report(results).split("## Provenance", 1)[1]
    (row,) = [line for line in text.splitlines() if line.startswith("| cgroup2 mount options")]
    assert [c.strip() for c in row.strip("|").split("|")][1:4] == ["rw,favordynmods", "absent", "—"]


def test_provenance_shows_how_tcg_ran_the_vcpus_where_recorded() -> None:
    results = load("partial-5.10-6.1.json")
    results["cells"][0]["tcg_thread"] = "single"
    text = render_report(results).split("## Provenance", 1)[1]
    (row,) = [line for line in text.splitlines() if line.startswith("| accel")]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["tcg, thread=single", "tcg"]


def test_provenance_shows_the_qemus_at_once_where_recorded() -> None:
    """Results from before qemu_slots was recorded get no row; a cell without it a dash."""
    results = load("partial-5.10-6.1.json")
    assert "| QEMUs at once" not in render_report(results)
    results["cells"][0]["qemu_slots"] = 3
    text = render_report(results).split("## Provenance", 1)[1]
    (row,) = [line for line in text.splitlines() if line.startswith("| QEMUs at once")]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["3", "—"]


def test_docker_cell_provenance_names_the_engine() -> None:
    results = load("dev-6.1.json")
    results["cells"].append(
        {
            "id": "host",
            "backend": "docker",
            "status": "ok",
            "kernel": {"release": "6.18.0"},
            "engine": {"name": "docker", "version": "27.5.1"},
            "scenarios": [],
        }
    )
    text = render_report(results)
    assert "Docker 27.5.1" in text and "host (container)" in text


def test_write_report_links_only_charts_that_exist(tmp_path: Path) -> None:
    results = with_oom(load("partial-5.10-6.1.json"))
    write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    # The findings picture, and the one experiment whose victims differ between the cells:
    # charts of equal bars would only repeat the tables.
    assert links == ["chart-findings.svg", "chart-oom-global-memfd-unmapped.svg"]
    assert all((tmp_path / link).is_file() for link in links)
    assert sorted(p.name for p in tmp_path.glob("chart-*.svg")) == sorted(links)


def test_charts_are_deterministic_and_stale_ones_removed(tmp_path: Path) -> None:
    results = load("dev-6.1.json")
    (tmp_path / "chart-gone.svg").write_text("<svg/>")
    first = {p.name: p.read_bytes() for p in write_charts(results, tmp_path)}
    second = {p.name: p.read_bytes() for p in write_charts(results, tmp_path)}
    assert first == second
    assert not (tmp_path / "chart-gone.svg").exists()
    svg = first["chart-findings.svg"].decode()
    assert "<dc:date>" not in svg and "MFD_NOEXEC_SEAL supported?" in svg


def test_no_charts_without_measurements() -> None:
    assert planned_charts({"cells": [{"id": "a", "status": "timeout"}]}) == []


def test_report_from_file_copies_results(tmp_path: Path) -> None:
    out = report_from_file(FIXTURES / "dev-6.1.json", "named", reports_dir=tmp_path)
    assert out == tmp_path / "named" / "report.md"
    assert (tmp_path / "named" / "results.json").read_bytes() == (
        FIXTURES / "dev-6.1.json"
    ).read_bytes()
    # Rendering next to the file itself must not try to copy it onto itself.
    report_from_file(tmp_path / "named" / "results.json")
    with pytest.raises(UserError, match=re.escape("report name '../x'")):
        report_from_file(FIXTURES / "dev-6.1.json", "../x", reports_dir=tmp_path)


@pytest.mark.parametrize("bad", ["a" * 101, "..", "a..b", "a/b", "/abs", "-x", ".x", ""])
def test_report_names_are_plain_and_at_most_100_characters(bad: str) -> None:
    assert check_report_name("a" * 100) == "a" * 100
    assert check_report_name("v1.2_rc+3-x") == "v1.2_rc+3-x"
    with pytest.raises(UserError, match="use a plain name"):
        check_report_name(bad)


def test_full_run_marks_noexec_seal_as_the_disagreement() -> None:
    rows = answer_all(load("full-5-kernels.json")["cells"])
    assert rows[0].question == "MFD_NOEXEC_SEAL supported?" and rows[0].disagree
    assert [a.key for a in rows[0].answers] == ["no:EINVAL", "no:EINVAL", "yes", "yes", "yes"]
    assert not any(r.disagree for r in rows[1:])


def test_refused_oom_experiments_are_not_answers_or_charts() -> None:
    results = with_oom(load("dev-6.1.json"))
    for exp in results["cells"][0]["oom"]:
        exp.update(status="refused", victims=[], panic=None)
    rows = {r.question: r for r in answer_all(results["cells"])}
    answer = rows["first OOM victim, holder's memfd unmapped"].answers[0]
    assert (answer.text, answer.key) == ("— (refused)", "")
    assert rows["panic when nothing is killable?"].answers[0].text == "— (refused)"
    assert not [c for c in planned_charts(results) if c.kind == "oom"]


def test_a_scenario_chart_only_where_cells_disagree() -> None:
    results = load("partial-5.10-6.1.json")
    assert not [c for c in planned_charts(results) if c.kind == "scenario"]
    changed = copy.deepcopy(results)
    memfd = next(s for s in changed["cells"][1]["scenarios"] if s["name"] == "memfd-write")
    memfd["metrics"]["VmRSS_delta"] = memfd["size_bytes"]  # 6.1 suddenly counts it in RSS
    assert [c.name for c in planned_charts(changed) if c.kind == "scenario"] == ["memfd-write"]


def test_findings_picture_colours_equal_answers_alike() -> None:
    assert answer_fill("yes") == answer_fill("yes:RssShmem") == answer_fill("True")
    assert answer_fill("no:EINVAL") == answer_fill("no") != answer_fill("yes")
    assert answer_fill("hog 3/3") != answer_fill("holder 3/3")
    assert answer_fill("hog 2/3, holder 1/3") not in (answer_fill("hog 3/3"), answer_fill(""))
    assert short_answer(Answer("yes, as RssShmem (+64.0 MiB, oom_score +12)", "x")) == (
        "yes, as\nRssShmem"
    )
