"""`invoke check` and the end of `invoke matrix` and `invoke cell`: expectations against
results, JUnit for CI.

Exit contract (errors.py): 0 when every expectation holds, 1 (ExpectationFailed) when any
fails, 2 when the check cannot run (unreadable results or matrix file).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from kmatrix.config import load_matrix
from kmatrix.errors import ExpectationFailed, UserError
from kmatrix.gate.expectations import Outcome, evaluate, expected_text, parse_expectation
from kmatrix.results.schema import AnyResults, atomic_write_bytes, load_results


def junit_xml(outcomes: Sequence[Outcome], suite: str = "kmatrix expectations") -> bytes:
    """JUnit XML with one testcase per expectation and cell."""
    failures = sum(o.result == "fail" for o in outcomes)
    skipped = sum(o.result == "skip" for o in outcomes)
    root = ET.Element("testsuites", tests=str(len(outcomes)), failures=str(failures))
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(outcomes)),
        failures=str(failures),
        skipped=str(skipped),
        errors="0",
    )
    for o in outcomes:
        case = ET.SubElement(
            ts, "testcase", classname=f"kmatrix.{o.expectation.scenario}", name=_case_name(o)
        )
        if o.result == "fail":
            msg = f"cell {o.cell}: observed {o.observed}, expected {expected_text(o.expectation)}"
            if o.why:
                msg += f" ({o.why})"
            ET.SubElement(case, "failure", message=msg).text = o.describe()
        elif o.result == "skip":
            ET.SubElement(case, "skipped", message=o.why)
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def _case_name(o: Outcome) -> str:
    return f"{o.expectation.text} [{o.cell}]"


def enforce(
    texts: Sequence[str],
    results: AnyResults,
    junit: Path | None = None,
    ran: Sequence[str] | None = None,
) -> str:
    """Evaluate expectation lines on results; write JUnit; raise ExpectationFailed on failures.

    ``ran`` names the cells of a partial run (``--kernels``): a named cell outside it is
    not expected in the results. Returns the one-line summary when everything holds.
    """
    expectations = [parse_expectation(t) for t in texts]
    outcomes = evaluate(expectations, results, ran)
    if junit is not None:
        atomic_write_bytes(junit, junit_xml(outcomes))
    failed = [o for o in outcomes if o.result == "fail"]
    passed = sum(o.result == "pass" for o in outcomes)
    skipped = len(outcomes) - passed - len(failed)
    counts = f"{passed} passed, {len(failed)} failed, {skipped} skipped"
    if failed:
        lines = [
            f"  - {o.expectation.text}: cell {o.cell} observed {o.observed}, expected "
            f"{expected_text(o.expectation)}" + (f" ({o.why})" if o.why else "")
            for o in failed
        ]
        raise ExpectationFailed(
            f"{len(failed)} expectation check(s) failed ({counts}):\n" + "\n".join(lines)
        )
    if not expectations:
        return "no expectations declared in the matrix file; nothing to check"
    cells = len({o.cell for o in outcomes})
    return f"{len(expectations)} expectation(s) hold on {cells} cell(s): {counts}"


def gate_run(results: AnyResults, matrix_path: Path, kernels: Sequence[str] = ()) -> str:
    """The end of `invoke matrix` and `invoke cell`: the expectations on the results a run
    returned; raises ExpectationFailed (exit 1) naming each failure.

    They are the ones the run recorded when it started (``run.expectations``): the matrix
    file may have been edited while the run went on. Results without them (a merge of
    runs that read different ones) are checked against the file as it is now.
    ``kernels`` are the cells of a partial run (``--kernels``; empty: all of them): a cell
    an expectation names outside them is not expected in the results.
    """
    recorded = results["run"].get("expectations")
    texts = recorded if recorded is not None else load_matrix(matrix_path).expectations
    return enforce(texts, results, ran=list(kernels) or None)


def stale_pins(results: AnyResults) -> list[str]:
    """One line per cell that ran a pinned version older than what its suites offered."""
    out = []
    for cell in results.get("cells") or []:
        stale = (cell.get("kernel") or {}).get("stale_pin")
        if isinstance(stale, dict):
            out.append(
                f"cell {cell.get('id')}: pinned {stale.get('pinned')}, but {stale.get('suite')} "
                f"offers {stale.get('package')} {stale.get('newest')}"
            )
    return out


def check_file(
    results_path: Path,
    matrix_path: Path,
    junit: Path | None = None,
    fail_on_stale: bool = False,
) -> str:
    """`invoke check`: the matrix file's expectations against a results file.

    Stale pins are reported in the summary; with ``fail_on_stale`` they fail the check.
    """
    if junit is not None and junit.is_dir():
        raise UserError(f"--junit {junit}: is a directory; give a file name, e.g. junit.xml")
    results = load_results(results_path)
    matrix = load_matrix(matrix_path)
    if not results.get("cells"):
        raise UserError(f"{results_path}: has no cells; run `invoke matrix` first")
    summary = enforce(matrix.expectations, results, junit)
    stale = stale_pins(results)
    if stale and fail_on_stale:
        raise ExpectationFailed(
            f"{len(stale)} stale pin(s) in {results_path}:\n"
            + "\n".join(f"  - {line}" for line in stale)
            + f"\nupdate `version:` in {matrix_path} (or drop it to follow the suite) and rerun"
        )
    if stale:
        summary += f"\n{len(stale)} stale pin(s) (--fail-on-stale fails on them):\n"
        summary += "\n".join(f"  - {line}" for line in stale)
    return summary
