"""Scale-out: `invoke ci-matrix`, `invoke cell` + `invoke merge`, and the GitHub workflow.

Merge refusals run on recorded real results files; one integration test boots two real cells
through the `cell` path, merges them, and compares with a single run of the same two cells.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmatrix.config import load_matrix
from kmatrix.errors import UserError
from kmatrix.report.markdown import render_report
from kmatrix.results.schema import load_results, write_results
from kmatrix.run.ci import ci_matrix, run_cell
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.merge import merge_files, merge_results
from kmatrix.run.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "fixtures" / "results"
WORKFLOW = ROOT / ".github" / "workflows" / "kernel-matrix.yml"


def _split(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One single-cell document per cell, as `invoke cell` jobs would write them."""
    parts = []
    for i, cell in enumerate(doc["cells"]):
        part = copy.deepcopy(doc)
        part["cells"] = [cell]
        part["run"]["name"] = f"cell-{cell['id']}"
        part["run"]["started"] = f"2026-11-25T20:1{i}:00+00:00"
        part["run"]["finished"] = f"2026-11-25T20:1{i}:30+00:00"
        parts.append(part)
    return parts


# --- ci-matrix ------------------------------------------------------------------------------


def test_ci_matrix_lists_every_cell_of_the_default_matrix() -> None:
    kernels = load_matrix(ROOT / "matrix.yaml").kernels
    out = subprocess.run(
        [sys.executable, "-m", "invoke", "ci-matrix"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.count("\n") == 1, "GITHUB_OUTPUT needs the matrix on one line"
    include = json.loads(out)["include"]
    assert [e["kernel"] for e in include] == [k.name for k in kernels]
    assert [e["backend"] for e in include] == [k.backend for k in kernels]
    assert json.loads(ci_matrix(ROOT / "matrix.yaml")) == {"include": include}


# --- merge: what it refuses -----------------------------------------------------------------


def test_merge_refuses_a_different_probe() -> None:
    # Both are real runs, of two different probe versions.
    with pytest.raises(UserError, match=r"host-docker\.json: probe_sha256 .* differs from"):
        merge_files([RESULTS / "dev-6.1.json", RESULTS / "host-docker.json"], "x", None)


def test_merge_refuses_a_duplicate_cell(tmp_path: Path) -> None:
    files = [RESULTS / "dev-6.1.json", RESULTS / "full-5-kernels.json"]
    with pytest.raises(UserError, match=r"full-5-kernels\.json: cell '6\.1' is also in .*dev-6"):
        merge_files(files, "x", None, reports_dir=tmp_path)
    assert not (tmp_path / "x").exists()


def test_merge_refuses_a_different_schema_version(tmp_path: Path) -> None:
    newer = load_results(RESULTS / "dev-6.1.json") | {"schema_version": 2}
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(UserError, match=r"newer\.json: not a kmatrix results file"):
        merge_files([RESULTS / "full-5-kernels.json", tmp_path / "newer.json"], "x", None)
    # The pure function says what differs, too.
    older = load_results(RESULTS / "full-5-kernels.json")
    with pytest.raises(UserError, match=r"input 2: schema_version 2 differs from input 1's 1"):
        merge_results([older, newer])


def test_merge_refuses_nothing_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no results files to merge"):
        merge_files([], "x", None, reports_dir=tmp_path)
    with pytest.raises(UserError, match=r"--name '\.\./x'"):
        merge_files([RESULTS / "dev-6.1.json"], "../x", None, reports_dir=tmp_path)


# --- merge: what it makes -------------------------------------------------------------------


def test_merge_of_split_cells_is_the_original_run(tmp_path: Path) -> None:
    full = load_results(RESULTS / "full-5-kernels.json")
    parts = _split(full)
    paths = []
    for part in reversed(parts):  # artifacts arrive in any order; the matrix decides
        paths.append(tmp_path / f"{part['cells'][0]['id']}.json")
        write_results(paths[-1], part)
    matrix = tmp_path / "matrix.yaml"
    names = [c["id"] for c in full["cells"]]
    kernels = [
        {"name": n, "suite": "bookworm", "package": "linux-image-cloud-amd64"} for n in names
    ]
    matrix.write_text(yaml.safe_dump({"kernels": kernels}))

    report = merge_files(paths, "merged", matrix, reports_dir=tmp_path / "reports")

    merged = load_results(tmp_path / "reports" / "merged" / "results.json")
    assert merged["cells"] == full["cells"]
    assert merged["run"]["started"] == parts[0]["run"]["started"]
    assert merged["run"]["finished"] == parts[-1]["run"]["finished"]
    expected = copy.deepcopy(full)
    expected["run"] |= {k: merged["run"][k] for k in ("name", "started", "finished")}
    assert merged == expected
    assert report.read_text() == render_report(expected)
    assert list(report.parent.glob("*.svg")), "the merged report has its charts"


def test_a_merge_keeps_the_expectations_only_when_every_run_read_the_same() -> None:
    """Runs that read different expectation lines leave none in the merge: the gate at the
    end of `invoke matrix --runtime docker` then reads the matrix file rather than the
    first run's lines."""
    parts = _split(load_results(RESULTS / "full-5-kernels.json"))[:2]
    for part in parts:
        part["run"]["expectations"] = ["memfd-write VmRSS < 1 MiB"]
    assert merge_results(parts)["run"].get("expectations") == ["memfd-write VmRSS < 1 MiB"]
    parts[1]["run"]["expectations"] = []
    assert "expectations" not in merge_results(parts)["run"]  # the check reads the file


def test_merge_without_order_keeps_input_order_and_per_host() -> None:
    parts = _split(load_results(RESULTS / "full-5-kernels.json"))[:2]
    parts[1]["run"]["host"] = parts[1]["run"]["host"] | {"cpus": 4}
    merged = merge_results(parts[::-1])
    assert [c["id"] for c in merged["cells"]] == ["6.1", "5.10"]
    # Different runners: each cell keeps the host it ran on.
    assert [c["host"]["cpus"] for c in merged["cells"]] == [4, 2]


# --- the workflow ---------------------------------------------------------------------------


def test_workflow_passes_actionlint() -> None:
    # The venv's bin/ may not be on PATH (`.venv/bin/python -m pytest` without activating).
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=Path(sys.executable).parent)
    assert exe, "actionlint is missing: pip install -e '.[dev]' installs it"
    # actionlint runs shellcheck on every run: step when it finds it on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(
        [exe, "-no-color", str(WORKFLOW)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PATH": path},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_names_no_host() -> None:
    text = WORKFLOW.read_text()
    # The Debian mirror comes from the runner's apt sources or a repository variable.
    hosts = re.findall(r"[a-z0-9-]+\.(?:org|net|com|io)\b", text)
    assert not [h for h in hosts if h != "github.com"], hosts


# --- two real cells through `cell` and `merge`, against one run of both ----------------------

TWO_CELLS = """
check_valid_until: false
guest: {suite: bookworm, memory: 256M, shm_size: 32M, disk_size: 64M}
probe: {size: 8M, scenarios: [memfd-write], cell_timeout: 300}
oom: {experiments: []}
kernels:
  - {name: one, suite: bookworm, package: linux-image-cloud-amd64}
  - {name: two, suite: bookworm, package: linux-image-cloud-amd64}
"""
TIMING = ("started", "finished", "duration_s", "cached", "interrupted")
_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


@pytest.mark.qemu
def test_two_cells_merged_equal_one_run_of_both(tmp_path: Path) -> None:
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(TWO_CELLS)
    quiet = Progress(io.StringIO(), live=False)
    partials = []
    for name in ("two", "one"):  # out of order on purpose: merge restores the matrix order
        partials.append(tmp_path / f"{name}.json")
        # --force: both cells really boot; the single run below then reads them from the cache
        # (two boots of one kernel never measure byte-identical numbers).
        cell = run_cell(
            matrix, name, partials[-1], force=True, reports_dir=tmp_path / "cells", progress=quiet
        )["cells"]
        assert [c["status"] for c in cell] == ["ok"], cell[0].get("reason")
        assert (tmp_path / "cells" / f"cell-{name}" / "console" / f"{name}.log").exists()
    merge_files(partials, "both", matrix, reports_dir=tmp_path / "merged")

    opts = RunOptions(matrix_path=matrix, name="both", reports_dir=tmp_path / "single")
    single = run_matrix(opts, quiet)

    merged = load_results(tmp_path / "merged" / "both" / "results.json")
    assert [c["id"] for c in merged["cells"]] == ["one", "two"]
    probes = {merged["run"]["probe_sha256"], single["run"]["probe_sha256"]}
    assert len(probes) == 1, "probes/ changed during the test; run it again"
    # A miss means something in the cache key (probe, init, userland) changed mid-test.
    assert [c["cached"] for c in single["cells"]] == [True, True]
    assert _mask(merged["run"]) == _mask(single["run"])
    for got, want in zip(merged["cells"], single["cells"], strict=True):
        assert _mask(got) == _mask(want), got["id"]
    reports = [(tmp_path / d / "both" / "report.md").read_text() for d in ("merged", "single")]
    assert _TIME_RE.sub("T", reports[0]) == _TIME_RE.sub("T", reports[1])


def _readme_caller() -> str:
    """The caller workflow the README shows (the fenced yaml block naming the workflow)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    (caller,) = [b for b in blocks if "kernel-matrix.yml@" in b]
    return caller


def test_workflow_is_callable_with_the_documented_inputs() -> None:
    doc = yaml.safe_load(WORKFLOW.read_text())
    inputs = doc[True]["workflow_call"]["inputs"]  # YAML 1.1 reads the key `on` as True
    assert {"matrix-file", "kmatrix-version", "kmatrix-ref", "runner"} <= set(inputs)
    assert doc["jobs"]["cell"]["needs"] == "plan" and doc["jobs"]["merge"]["needs"] == [
        "plan",
        "cell",
    ]
    # Every job installs kmatrix the same way and then uses the `kmatrix` command.
    assert "invoke " not in json.dumps(doc["jobs"])


def test_readme_caller_passes_actionlint_against_the_workflow(tmp_path: Path) -> None:
    """actionlint checks a local reusable workflow's inputs: the README's `with:` must fit."""
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    (tmp_path / ".git").mkdir()  # actionlint resolves ./.github/... from the repository root
    shutil.copy(WORKFLOW, workflows / "kernel-matrix.yml")
    caller = _readme_caller()
    assert len(caller.strip().splitlines()) <= 14
    local = re.sub(r"OWNER/kmatrix/(\.github/workflows/kernel-matrix\.yml)@\S+", r"./\1", caller)
    (workflows / "caller.yml").write_text(local)
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=Path(sys.executable).parent)
    assert exe
    proc = subprocess.run(
        [exe, "-no-color", "-shellcheck=", str(workflows / "caller.yml")],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A wrong input name is caught, so the check above means something.
    (workflows / "caller.yml").write_text(local.replace("matrix-file:", "matrix-fil:"))
    bad = subprocess.run(
        [exe, "-no-color", "-shellcheck=", str(workflows / "caller.yml")],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "matrix-fil" in bad.stdout
