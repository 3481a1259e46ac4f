"""The results contract (results.json, schema_version 1) and atomic file writes.

Results are plain JSON-compatible dicts so that other tools can read them without
kmatrix; their types are in ``results.contract``. This module writes and loads (and
validates) them, starts a cell, and parses the probe's output.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast, get_args

import pydantic
from pydantic_core import ErrorDetails

from kmatrix.errors import UserError
from kmatrix.results.contract import Backend, Cell, CellStatus, Hello, Results, Scenario

SCHEMA_VERSION: Final = 1
RECORD_PREFIX = "KMX1 "
CELL_STATUSES: tuple[CellStatus, ...] = get_args(CellStatus)

#: An untyped JSON object: a probe record before it becomes part of a cell, or a results
#: document as the readers (report/, gate/, results/view.py) take it.
JSON = dict[str, Any]
#: A results document as the readers take it: a :class:`Results`, or the plain dict of an
#: older or partial file (readers tolerate missing keys).
AnyResults = Mapping[str, Any]


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


def write_results(path: Path, results: Results) -> None:
    """Write a results document atomically, pretty-printed with sorted keys for clean diffs."""
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True) + "\n")


#: What a user can do about a results file kmatrix cannot use.
_FIX = (
    "regenerate it with `invoke matrix` (or `invoke merge`), or check the file is a "
    "kmatrix results.json"
)


def load_results(path: Path) -> Results:
    """Read a results.json and validate it against the contract (``results.contract``).

    Every reader (``invoke report``, ``check``, ``diff``, ``merge``, a run's previous
    results) loads through here. A file that is not UTF-8 JSON, has another
    ``schema_version`` or departs from the types is a :class:`UserError` naming the file,
    the first field at fault (``cells[2].oom[0].runs[1].kills``) and what to do. The
    document is returned as read: validation neither converts nor drops anything.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, so not a kmatrix results file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read results ({exc.strerror})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); was it truncated?") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"{path}: not a kmatrix results file with schema_version {SCHEMA_VERSION}; {_FIX}"
        )
    problem = shape_problem(data)
    if problem:
        raise UserError(f"{path}: not a valid kmatrix results file: {problem}; {_FIX}")
    return cast(Results, data)


@functools.cache
def _validator() -> pydantic.TypeAdapter[Results]:
    # Built on first use: it takes a quarter of a second, which commands that never load
    # a results file should not pay.
    return pydantic.TypeAdapter(Results)


def shape_problem(data: object) -> str | None:
    """The first way ``data`` departs from :class:`Results`, as ``path: problem``, or None.

    Strict: nothing is coerced (``"5"`` is not an integer, ``1`` not a boolean); keys the
    contract does not know are ignored.
    """
    try:
        _validator().validate_python(data, strict=True)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return describe_error(errors[0]) + more
    return None


#: pydantic error types in words; anything else keeps pydantic's message.
_WANTED = {
    "missing": "is missing",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "none_required": "must be null",
    "too_short": "must not be empty",
    "string_too_short": "must be a non-empty string",
}


def describe_error(error: ErrorDetails) -> str:
    """One pydantic error as ``cells[2].oom[0].repeats must be an integer (found '3')``."""
    where = field_path(error["loc"]) or "the document"
    kind = error["type"]
    if kind == "literal_error":
        wanted = f"must be one of {error.get('ctx', {}).get('expected', '?')}"
    else:
        wanted = _WANTED.get(kind, error["msg"][:1].lower() + error["msg"][1:])
    if kind == "missing":
        return f"{where} {wanted}"
    found = json.dumps(error.get("input"), default=str)
    found = found if len(found) <= 60 else found[:57] + "..."
    return f"{where} {wanted} (found {found})"


def field_path(loc: Sequence[int | str]) -> str:
    """pydantic's ``("cells", 2, "oom", 0, "kills")`` as ``cells[2].oom[0].kills``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass
class ProbeOutput:
    """What the probe reported over the result channel, parsed and checked."""

    hello: Hello | None = None  # as the probe sent it: not checked beyond its type
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
        out.hello = cast(Hello, rec)
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


def scenario_result(rec: JSON) -> Scenario:
    """The results.json form of one probe scenario record (contract keys first)."""
    out: Scenario = {
        "name": rec["name"],
        "metrics": rec["metrics"],
        "errno": rec.get("errno"),
        "error": rec.get("error"),
    }
    # The probe always sends these; a record without one makes a scenario without it.
    if "size_bytes" in rec:
        out["size_bytes"] = rec["size_bytes"]
    if "detail" in rec:
        out["detail"] = rec["detail"]
    if "before" in rec:
        out["before"] = rec["before"]
    if "after" in rec:
        out["after"] = rec["after"]
    return out


def new_cell(cell_id: str, backend: Backend) -> Cell:
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


def mark_incomplete(cell: Cell) -> Cell:
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
