"""The shared names (scenarios, OOM experiments, roles): probes/catalog.py, loaded by path.

The probe is copied into guests as plain files and cannot import kmatrix, so the one copy
of the names lives with the probe; this module reads it without importing anything else
of the probe (no parser is imported to get a tuple of names).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

#: The same directory as kmatrix.guest.PROBES_DIR (kept here so that loading the names
#: imports nothing that builds guests).
PROBES_DIR = Path(__file__).resolve().parents[2] / "probes"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kmatrix_probe_catalog", PROBES_DIR / "catalog.py"
    )
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships with kmatrix
        raise ImportError(f"cannot load {PROBES_DIR / 'catalog.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CATALOG = _load()
SCENARIOS: tuple[str, ...] = tuple(_CATALOG.SCENARIOS)
EXPERIMENTS: tuple[str, ...] = tuple(_CATALOG.EXPERIMENTS)
EXPECTED_PANIC: frozenset[str] = frozenset(_CATALOG.EXPECTED_PANIC)
ROLES: tuple[str, ...] = tuple(_CATALOG.ROLES)
