"""The results contract (results.json, schema_version 1) and atomic file writes.

Results are plain JSON-compatible dicts so that other tools can read them without
kmatrix; this module owns their shape, the probe-output parser and the atomic writer.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmatrix.errors import UserError

SCHEMA_VERSION = 1
RECORD_PREFIX = "KMX1 "
CELL_STATUSES = ("ok", "incomplete", "failed", "timeout", "panic", "error", "skipped")

JSON = dict[str, Any]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text flavour of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def write_results(path: Path, results: JSON) -> None:
    """Write a results document atomically, pretty-printed with sorted keys for clean diffs."""
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True) + "\n")


def load_results(path: Path) -> JSON:
    """Read a results.json, checking it is one this version of kmatrix understands."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, so not a kmatrix results file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read results ({exc.strerror})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); was it truncated?") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: not a kmatrix results file with schema_version {SCHEMA_VERSION}")
    problem = shape_problem(data)
    if problem:
        raise UserError(
            f"{path}: not a valid kmatrix results file: {problem}; regenerate it with "
            "`invoke matrix` or `invoke merge`"
        )
    return data


def shape_problem(data: JSON) -> str | None:
    """The first way ``data`` departs from the results schema (the parts readers use), or None."""
    if not isinstance(data.get("run"), dict):
        return "'run' must be an object"
    cells = data.get("cells")
    if not isinstance(cells, list):
        return "'cells' must be a list"
    for i, cell in enumerate(cells):
        where = f"cells[{i}]"
        if not isinstance(cell, dict):
            return f"{where} must be an object"
        if not isinstance(cell.get("id"), str) or not cell["id"]:
            return f"{where}.id must be a non-empty string"
        if cell.get("status") not in CELL_STATUSES:
            return f"{where}.status must be one of {', '.join(CELL_STATUSES)}"
        for key in ("scenarios", "oom"):
            items = cell.get(key, [])
            if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
                return f"{where}.{key} must be a list of objects"
        for key in ("kernel", "probe"):
            if not isinstance(cell.get(key, {}), dict):
                return f"{where}.{key} must be an object"
        for sc in cell.get("scenarios", []):
            if not isinstance(sc.get("name"), str) or not isinstance(sc.get("metrics", {}), dict):
                return f"{where}: a scenario needs a string name and a metrics object"
            bad = [k for k, v in sc.get("metrics", {}).items() if type(v) is not int]
            if bad:
                return f"{where} scenario {sc['name']}: metric {bad[0]} is not an integer"
        for exp in cell.get("oom", []):
            if not isinstance(exp.get("name"), str):
                return f"{where}: an OOM entry needs a string name"
    return None


@dataclass
class ProbeOutput:
    """What the probe reported over the result channel, parsed and checked."""

    hello: JSON | None = None
    scenarios: list[JSON] = field(default_factory=list)
    oom: list[JSON] = field(default_factory=list)
    done: JSON | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when the probe said hello, finished, and nothing was garbled."""
        return self.hello is not None and self.done is not None and not self.problems


def parse_probe_output(lines: Iterable[str]) -> ProbeOutput:
    """Parse ``KMX1 {json} crc32`` records; anything garbled is noted, never guessed at.

    Lines without the prefix are ignored (the serial line may carry kernel noise), but a
    prefixed line that is not a complete JSON object is a problem: a truncated or
    interleaved record must turn the cell into an error, not into a number.
    """
    out = ProbeOutput()
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n").replace("\r", "")
        start = line.find(RECORD_PREFIX)
        if start < 0:
            continue
        payload, _, crc = line[start + len(RECORD_PREFIX) :].rpartition(" ")
        if not _crc_ok(payload, crc):
            out.problems.append(f"line {lineno}: garbled record (checksum) {line[:80]!r}")
            continue
        try:
            rec = json.loads(payload)
        except json.JSONDecodeError:
            out.problems.append(f"line {lineno}: garbled record {line[:80]!r}")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
            out.problems.append(f"line {lineno}: record without a type")
            continue
        _file_record(out, rec, lineno)
    if out.done is not None and out.done.get("scenarios") not in (None, len(out.scenarios)):
        out.problems.append(
            f"probe said it ran {out.done.get('scenarios')} scenarios, {len(out.scenarios)} arrived"
        )
    return out


def _crc_ok(payload: str, crc: str) -> bool:
    try:
        return len(crc) == 8 and zlib.crc32(payload.encode()) == int(crc, 16)
    except ValueError:
        return False


def _file_record(out: ProbeOutput, rec: JSON, lineno: int) -> None:
    kind = rec["type"]
    if kind == "hello":
        out.hello = rec
    elif kind == "scenario":
        if not isinstance(rec.get("name"), str) or not isinstance(rec.get("metrics"), dict):
            out.problems.append(f"line {lineno}: scenario record without name or metrics")
            return
        bad = [k for k, v in rec["metrics"].items() if not isinstance(v, int)]
        if bad:
            out.problems.append(f"line {lineno}: non-integer metrics {bad} in {rec['name']}")
            return
        out.scenarios.append(rec)
    elif kind == "oom":
        out.oom.append(rec)
    elif kind == "done":
        out.done = rec
    else:
        out.problems.append(f"line {lineno}: unknown record type {kind!r}")


def scenario_result(rec: JSON) -> JSON:
    """The results.json form of one probe scenario record (contract keys first)."""
    keep = ("name", "size_bytes", "metrics", "errno", "error", "detail", "before", "after")
    return {k: rec.get(k) for k in keep if k in rec} | {"errno": rec.get("errno")}


def new_cell(cell_id: str, backend: str) -> JSON:
    """An empty cell, filled in by a backend."""
    return {
        "id": cell_id,
        "backend": backend,
        "status": "error",
        "reason": "not run",
        "accel": None,
        "duration_s": 0.0,
        "memory_bytes": None,
        "kernel": {},
        "scenarios": [],
        "oom": [],
    }


def mark_incomplete(cell: JSON) -> JSON:
    """An ``ok`` cell with an OOM experiment in ``error`` becomes ``incomplete``.

    Its accounting numbers stand, but a part of what the matrix asked for is missing: such
    a cell must not pass as ``ok`` nor enter the result cache (it is rerun next time).
    """
    broken = [e for e in cell.get("oom") or [] if e.get("status") == "error"]
    if cell.get("status") != "ok" or not broken:
        return cell
    names = ", ".join(str(e.get("name")) for e in broken)
    first = str(broken[0].get("reason") or "no reason recorded")
    return cell | {
        "status": "incomplete",
        "reason": f"OOM experiment(s) in error: {names} ({first[:200]})",
    }
