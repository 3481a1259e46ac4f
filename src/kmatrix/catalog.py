"""One catalog of names shared by the config, the probe and the expectations.

Scenario names are read from the probe's own registry (``probes/scenarios.py``, the
``Scenario("NAME", ...)`` entries) without importing it: the probe is guest code and
imports guest-only modules. OOM experiment names are kmatrix.oomresults.EXPERIMENTS, which
the probe's OOM harness is tested against. Nothing here copies a list of names.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from kmatrix.oomresults import EXPERIMENTS

PROBE_SCENARIOS_FILE = Path(__file__).resolve().parents[2] / "probes" / "scenarios.py"

#: Roles of the OOM experiments (probes/oom_roles.py), and "none" for no victim.
ROLES = ("hog", "holder", "bystander", "none")


@cache
def scenarios() -> tuple[str, ...]:
    """The probe's accounting scenario names, in its canonical order."""
    tree = ast.parse(PROBE_SCENARIOS_FILE.read_text(), str(PROBE_SCENARIOS_FILE))
    names: list[str] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "Scenario"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    # ast.walk is breadth-first; the registry list is flat, so order is the source order.
    return tuple(names)


def experiments() -> tuple[str, ...]:
    """The OOM experiment names (kmatrix.oomresults.EXPERIMENTS, read at call time)."""
    return tuple(EXPERIMENTS)


def suggest(word: str, choices: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for a close match, else the list of known names."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(choices)})"


def unknown_names(given: Sequence[str], known: Sequence[str], what: str) -> str | None:
    """A message for the names in ``given`` that are not in ``known``, or None."""
    bad = [n for n in given if n not in known]
    if not bad:
        return None
    return f"unknown {what} {', '.join(repr(b) for b in bad)}{suggest(bad[0], known)}"
