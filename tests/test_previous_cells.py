"""A run carries over the previous run's cells, and keeps a previous file it cannot read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kmatrix.report.dirs import previous_cells

FIXTURE = Path(__file__).parent / "fixtures" / "results" / "partial-5.10-6.1.json"


def test_previous_cells_are_carried_over(tmp_path: Path) -> None:
    shutil.copyfile(FIXTURE, tmp_path / "results.json")
    cells = previous_cells(tmp_path, ["6.1", "absent"])
    assert [c["id"] for c in cells] == ["6.1"]
    assert cells[0]["carried_over"].startswith("from the run started")


def test_an_unreadable_previous_file_is_kept_and_said(tmp_path: Path) -> None:
    doc = json.loads(FIXTURE.read_text())
    doc["cells"][0]["scenarios"] = "none"  # not what kmatrix writes
    (tmp_path / "results.json").write_text(json.dumps(doc))
    said: list[str] = []
    assert previous_cells(tmp_path, ["6.1"], said.append) == []
    assert (tmp_path / "results.unreadable.json").read_text() == json.dumps(doc)
    assert (
        len(said) == 1 and "cells[0].scenarios" in said[0] and "results.unreadable.json" in said[0]
    )
