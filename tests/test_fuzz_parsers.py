"""Random and truncated input never crashes a parser and never turns into a number."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kmatrix.cells.console import analyze_console
from kmatrix.results.schema import parse_probe_output

FIXTURES = Path(__file__).parent / "fixtures" / "guest"
RESULTS_LOG = (FIXTURES / "6.1-results.log").read_text()
CONSOLE_LOG = (FIXTURES / "6.1-console.log").read_text()


@given(st.text())
def test_probe_parser_survives_any_text(text: str) -> None:
    out = parse_probe_output(text.splitlines())
    assert not out.scenarios  # random text never carries a valid record
    assert not out.complete


@given(st.integers(min_value=0, max_value=len(RESULTS_LOG.rstrip()) - 1))
@settings(max_examples=200)
def test_truncated_output_is_incomplete_and_keeps_only_whole_records(cut: int) -> None:
    out = parse_probe_output(RESULTS_LOG[:cut].splitlines())
    assert not out.complete
    # Every scenario that survived is one whose whole line (with its checksum) arrived.
    for sc in out.scenarios:
        assert f'"name":"{sc["name"]}"' in RESULTS_LOG[:cut]


@given(st.integers(min_value=0, max_value=len(RESULTS_LOG) - 1), st.text(min_size=1, max_size=40))
@settings(max_examples=200)
def test_injected_noise_never_yields_a_changed_record(pos: int, noise: str) -> None:
    garbled = RESULTS_LOG[:pos] + noise + RESULTS_LOG[pos:]
    original = {s["name"]: s for s in parse_probe_output(RESULTS_LOG.splitlines()).scenarios}
    for sc in parse_probe_output(garbled.splitlines()).scenarios:
        assert original.get(sc["name"]) == sc


@given(st.text())
def test_console_parser_survives_any_text(text: str) -> None:
    summary = analyze_console(text)
    assert len(summary.tail) <= 40


@given(st.integers(min_value=0, max_value=len(CONSOLE_LOG)))
@settings(max_examples=100)
def test_truncated_console_never_invents_a_panic(cut: int) -> None:
    assert analyze_console(CONSOLE_LOG[:cut]).panic is None
