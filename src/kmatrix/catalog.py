"""The shared names (scenarios, OOM experiments, roles): probes/catalog.py, loaded by path.

The probe is copied into guests as plain files and cannot import kmatrix, so the one copy
of the names lives with the probe; this module reads that file without importing anything
else of the probe (no parser is imported to get a tuple of names). Tests check that the
probe's registries (scenarios.SCENARIOS, oom.EXPERIMENTS, the roles it forks) use exactly
these names.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from types import ModuleType

from kmatrix.resources import data_root

#: The same directory as kmatrix.guest.userland.PROBES_DIR: the checkout's probes/ or the installed
#: package's copy (kmatrix.resources imports nothing that builds guests).
PROBES_DIR = data_root() / "probes"


def probe_module(name: str) -> ModuleType:
    """A probe module that imports only the standard library (``catalog``, ``resume``),
    loaded by path: the host reads the probe's own constants instead of copying them."""
    path = PROBES_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kmatrix_probe_{name}", path)
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships with kmatrix
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CATALOG = probe_module("catalog")
SCENARIOS: tuple[str, ...] = tuple(_CATALOG.SCENARIOS)
EXPERIMENTS: tuple[str, ...] = tuple(_CATALOG.EXPERIMENTS)
EXPECTED_PANIC: frozenset[str] = frozenset(_CATALOG.EXPECTED_PANIC)
ROLES: tuple[str, ...] = tuple(_CATALOG.ROLES)
FIRST_PASS_ONLY: frozenset[str] = frozenset(_CATALOG.FIRST_PASS_ONLY)
ENDS_BOOT: frozenset[str] = frozenset(_CATALOG.ENDS_BOOT)
NEEDS_SWAP: frozenset[str] = frozenset(_CATALOG.NEEDS_SWAP)


def scenarios() -> tuple[str, ...]:
    """The probe's accounting scenario names, in its canonical order."""
    return SCENARIOS


def experiments() -> tuple[str, ...]:
    """The OOM experiment names, in report order."""
    return EXPERIMENTS


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
