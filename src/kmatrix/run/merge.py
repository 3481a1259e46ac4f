"""`invoke merge`: partial results files (one per CI job) -> one results.json and its report.

Only results of the same probe and schema may share a report: a table whose columns ran
different probes would compare unlike things, so such inputs are refused, naming the file.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path

from kmatrix.config import NAME_RE, load_matrix
from kmatrix.errors import UserError
from kmatrix.report.markdown import REPORTS, write_report
from kmatrix.results.contract import Cell, Results, RunHeader
from kmatrix.results.schema import load_results, write_results


def _check_same(docs: Sequence[Results], sources: Sequence[str]) -> None:
    """Refuse inputs that cannot share one report, naming the file and what differs."""
    first = docs[0]
    for doc, src in zip(docs[1:], sources[1:], strict=True):
        if doc.get("schema_version") != first.get("schema_version"):
            raise UserError(
                f"{src}: schema_version {doc.get('schema_version')} differs from "
                f"{sources[0]}'s {first.get('schema_version')}; rerun that cell with the same "
                "kmatrix version"
            )
        probe, want = doc["run"].get("probe_sha256"), first["run"].get("probe_sha256")
        if probe != want:
            raise UserError(
                f"{src}: probe_sha256 {str(probe)[:12]}… differs from {sources[0]}'s "
                f"{str(want)[:12]}…: the cells ran different probes; rerun them from one commit"
            )
    seen: dict[str, str] = {}
    for doc, src in zip(docs, sources, strict=True):
        for cell in doc.get("cells") or []:
            if cell["id"] in seen:
                raise UserError(
                    f"{src}: cell {cell['id']!r} is also in {seen[cell['id']]}; "
                    "pass each cell's results once"
                )
            seen[cell["id"]] = src


def _when(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _merged_run(docs: Sequence[Results], name: str | None) -> RunHeader:
    """The first input's run, spanning the earliest start to the latest finish."""
    run = copy.deepcopy(docs[0]["run"])
    started = [s for d in docs if (s := d["run"].get("started"))]
    finished = [f for d in docs if (f := d["run"].get("finished"))]
    run["started"] = min(started, key=_when) if started else None
    run["finished"] = max(finished, key=_when) if finished else None
    if name is not None:
        run["name"] = name
    if any(d["run"].get("expectations") != run.get("expectations") for d in docs):
        run.pop("expectations", None)  # runs that read different ones: none of them speaks
    return run


def merge_results(
    docs: list[Results],
    *,
    name: str | None = None,
    order: Sequence[str] = (),
    sources: Sequence[str] = (),
) -> Results:
    """Merge results documents into one: cells in ``order`` (cell ids), others in input order.

    ``sources`` names the inputs in error messages (default: "input 1", "input 2", ...).
    When the inputs ran on different hosts, each cell keeps its own run's ``host``.
    """
    if not docs:
        raise UserError("no results to merge; pass the partial files, e.g. --files a.json,b.json")
    labels = list(sources) or [f"input {i + 1}" for i in range(len(docs))]
    _check_same(docs, labels)
    per_host = len({json.dumps(d["run"].get("host"), sort_keys=True) for d in docs}) > 1
    cells: list[Cell] = []
    for doc in docs:
        for cell in doc.get("cells") or []:
            cells.append((cell | {"host": doc["run"].get("host")}) if per_host else cell)
    rank = {cid: i for i, cid in enumerate(order)}
    # sorted() is stable: cells the order does not name keep their input order, at the end.
    cells.sort(key=lambda c: rank.get(c["id"], len(rank)))
    return {
        "schema_version": docs[0]["schema_version"],
        "run": _merged_run(docs, name),
        "cells": copy.deepcopy(cells),
    }


def merge_files(
    paths: Sequence[Path],
    name: str,
    matrix_path: Path | None = None,
    reports_dir: Path = REPORTS,
) -> Path:
    """Load and merge partial results files, write reports/NAME/results.json and report.md.

    Cells follow the matrix file's order when one is given. Returns the report's path.
    """
    if not NAME_RE.match(name):
        raise UserError(
            f"--name {name!r}: use letters, digits and . _ + - only (it becomes a directory "
            f"under {reports_dir})"
        )
    if not paths:
        raise UserError("no results files to merge; pass --files a.json,b.json")
    docs = [load_results(p) for p in paths]
    order = [k.name for k in load_matrix(matrix_path).kernels] if matrix_path else []
    merged = merge_results(docs, name=name, order=order, sources=[str(p) for p in paths])
    out = reports_dir / name
    write_results(out / "results.json", merged)
    return write_report(merged, out)
