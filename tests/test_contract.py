"""The results contract (kmatrix.results.contract): real files, the loader's messages, the
producers' output and the README's "results.json" section all agree with the types."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import pydantic
import pytest
from typing_extensions import is_typeddict

from kmatrix.backends.docker import EngineInfo
from kmatrix.cells.docker import refused_record
from kmatrix.errors import UserError
from kmatrix.results import contract, contract_oom, oomlog
from kmatrix.results.oom import BootOutput, Unit, assemble, entries_from_probe
from kmatrix.results.repeats import aggregate_scenarios
from kmatrix.results.schema import (
    CELL_STATUSES,
    load_results,
    mark_incomplete,
    new_cell,
    parse_probe_output,
)

ROOT = Path(__file__).resolve().parents[1]
#: The committed real run and the recorded older runs.
REAL = [ROOT / "reports" / "latest" / "results.json", *sorted((ROOT / "tests" / "fixtures" /
        "results").glob("*.json"))]  # fmt: skip
OOM = ROOT / "tests" / "fixtures" / "oom"


def _strict(tp: Any, value: Any) -> None:
    pydantic.TypeAdapter(tp).validate_python(value, strict=True)


def _unknown_keys(tp: Any, value: Any, path: str = "") -> list[str]:
    """Keys of ``value`` that the TypedDicts of ``tp`` do not declare, as paths."""
    if is_typeddict(tp):
        if not isinstance(value, dict):
            return []
        hints = typing.get_type_hints(tp)
        out = [f"{path}.{k} ({tp.__name__})" for k in value if k not in hints]
        for k, v in value.items():
            if k in hints:
                out += _unknown_keys(hints[k], v, f"{path}.{k}")
        return out
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [u for a in args if a is not type(None) for u in _unknown_keys(a, value, path)]
    if origin is list and isinstance(value, list):
        return [u for i, v in enumerate(value) for u in _unknown_keys(args[0], v, f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict):
        return [u for k, v in value.items() for u in _unknown_keys(args[1], v, f"{path}.{k}")]
    return []


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_results_validate_and_use_only_documented_keys(path: Path) -> None:
    doc = load_results(path)
    assert doc == json.loads(path.read_text())  # returned as read: nothing dropped or coerced
    assert _unknown_keys(contract.Results, doc) == []


def test_unknown_keys_are_found_by_the_key_check_and_ignored_by_the_loader(
    tmp_path: Path,
) -> None:
    doc = json.loads(SEVEN.read_text())
    doc["cells"][0]["oom"][0]["runs"][0]["shmem"]["new_fact"] = 1
    doc["cells"][0]["future"] = {"x": 1}
    assert _unknown_keys(contract.Results, doc) == [
        ".cells[0].future (Cell)",
        ".cells[0].oom[0].runs[0].shmem.new_fact (ShmemAccount)",
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    assert load_results(path)["cells"][0]["future"] == {"x": 1}  # type: ignore[typeddict-item]


#: A copy of a real 7-cell run: reports/latest is rewritten by `invoke matrix --kernels X`.
SEVEN = ROOT / "tests" / "fixtures" / "results" / "latest-7-cells.json"


def _broken(tmp_path: Path, change: Any) -> str:
    doc = json.loads(SEVEN.read_text())
    change(doc)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError) as err:
        load_results(path)
    return str(err.value)


def test_a_wrong_type_deep_down_is_named_by_its_path(tmp_path: Path) -> None:
    def change(doc: Any) -> None:
        doc["cells"][2]["oom"][0]["runs"][1]["kills"] = "none"

    message = _broken(tmp_path, change)
    assert message == (
        f"{tmp_path / 'results.json'}: not a valid kmatrix results file: "
        'cells[2].oom[0].runs[1].kills must be a list (found "none"); regenerate it with '
        "`invoke matrix` (or `invoke merge`), or check the file is a kmatrix results.json"
    )


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        (("cells", 1, "oom", 3, "runs", 0, "knobs", "swap_total"), "0",
         'cells[1].oom[3].runs[0].knobs.swap_total must be an integer (found "0")'),
        (("cells", 0, "scenarios", 2, "metrics", "VmRSS_delta"), 1.5,
         "cells[0].scenarios[2].metrics.VmRSS_delta must be an integer (found 1.5)"),
        (("cells", 0, "oom", 0, "panic_expected"), 1,
         "cells[0].oom[0].panic_expected must be true or false (found 1)"),
        (("cells", 3, "status"), "great", "cells[3].status must be one of 'ok', "),
        (("cells", 0, "oom", 0, "status"), "fine", "cells[0].oom[0].status must be one of"),
        (("cells", 4), 7, "cells[4] must be an object (found 7)"),
        (("run", "host"), None, "run.host must be an object (found null)"),
        (("schema_version",), 2, "not a kmatrix results file with schema_version 1;"),
    ],
)  # fmt: skip
def test_what_the_loader_says(tmp_path: Path, where: tuple[Any, ...], value: Any,
                              expected: str) -> None:  # fmt: skip
    def change(doc: Any) -> None:
        for key in where[:-1]:
            doc = doc[key]
        doc[where[-1]] = value

    message = _broken(tmp_path, change)
    assert expected in message and "Traceback" not in message


def test_a_missing_key_and_the_count_of_the_others(tmp_path: Path) -> None:
    def change(doc: Any) -> None:
        del doc["run"]["probe_sha256"]
        del doc["cells"][0]["kernel"]

    message = _broken(tmp_path, change)
    assert "run.probe_sha256 is missing (and 1 more problem(s));" in message


def test_numbers_are_not_coerced_but_an_integer_is_a_number() -> None:
    scenario = {"name": "x", "metrics": {"VmRSS_delta": 0}, "errno": None, "error": None}
    _strict(contract.Scenario, scenario | {"repeats": [{"metrics": {}, "errno": None,
            "error": None, "duration_s": 1}]})  # fmt: skip
    with pytest.raises(pydantic.ValidationError):
        _strict(contract.Scenario, scenario | {"size_bytes": "64"})
    with pytest.raises(pydantic.ValidationError):
        _strict(contract.Scenario, scenario | {"size_bytes": True})


# --- the producers build what the types say --------------------------------------------


def _boot(index: int, units: list[Unit], end: Any) -> BootOutput:
    probe = parse_probe_output((OOM / f"6.12-boot{index}.results.log").read_text().splitlines())
    return BootOutput(index, units, probe, (OOM / f"6.12-boot{index}.console.log").read_text(), end)


RECORDED = [
    "oom-global-memfd-unmapped", "oom-global-memfd-mapped", "oom-global-tmpfile-shm",
    "oom-global-shm-named", "oom-global-fd-passed", "oom-memcg-v2", "oom-memcg-v2-group",
    "oom-memcg-v1", "oom-no-killable",
]  # fmt: skip


def test_oom_entries_from_recorded_boots_are_of_the_contract() -> None:
    units = [Unit(n, r) for n in RECORDED for r in range(3)]
    left = [Unit("oom-no-killable", 1), Unit("oom-no-killable", 2)]
    end = {"duration_s": 9.5, "timed_out": False, "returncode": 0,
           "panic": "System is deadlocked on memory", "console_tail": ["x"]}  # fmt: skip
    one, two = _boot(1, units, end), _boot(2, left, end | {"panic": None, "timed_out": True})
    two.console = ""  # hung: the repeat it ran is recorded as crashed
    entries = assemble(units, [one, two])
    assert {r["status"] for e in entries for r in e["runs"]} >= {"ok", "crashed"}
    _strict(list[contract_oom.OomExperiment], entries)
    _strict(list[contract_oom.OomExperiment], assemble(units, []))
    _strict(list[contract_oom.OomExperiment], entries_from_probe(one.probe))
    _strict(list[contract_oom.OomBoot], [one.summary(), two.summary()])
    assert _unknown_keys(list[contract_oom.OomExperiment], entries) == []


def test_cells_and_scenarios_are_of_the_contract() -> None:
    doc = json.loads(REAL[0].read_text())
    records = [
        {"type": "scenario", "repeat": i, "duration_s": rep["duration_s"], **{
            k: v for k, v in sc.items() if k not in ("repeats", "spread")} | rep}
        for sc in doc["cells"][0]["scenarios"]
        for i, rep in enumerate(sc["repeats"])
    ]  # fmt: skip
    scenarios = aggregate_scenarios(records)
    _strict(list[contract.Scenario], scenarios)
    assert scenarios == doc["cells"][0]["scenarios"]
    cell = new_cell("6.1", "qemu") | {"status": "ok", "scenarios": scenarios}
    cell["oom"] = [refused_record("oom-no-killable") | {"status": "error"}]
    _strict(contract.Cell, new_cell("6.1", "docker"))
    _strict(contract.Cell, mark_incomplete(cell))
    assert mark_incomplete(cell)["status"] == "incomplete"


def test_generic_copies_have_the_keys_of_their_types() -> None:
    """Where a producer copies keys it does not name (casts), the sources have those keys."""
    kill_fields = {f.name for f in dataclasses.fields(oomlog.Kill)}
    assert kill_fields | {"role", "trigger"} == set(typing.get_type_hints(contract_oom.OomKill))
    info = EngineInfo("27.0", "1.46", "6.1.0", "v2", "systemd", "Debian", 1 << 30, True)
    assert set(info.as_json()) | {"image"} == set(typing.get_type_hints(contract.Engine))
    assert typing.get_args(contract.CellStatus) == CELL_STATUSES


# --- the README documents every key, and no other ---------------------------------------

_BULLET = re.compile(r"^- \*\*(\w+)\*\*(.*)")
_KEY = re.compile(r"`([A-Za-z_]\w*)`")
_AS = re.compile(r"\bas \*\*(\w+)\*\*")


def _readme_section() -> dict[str, tuple[set[str], set[str], list[str]]]:
    """Per bold name in the README's results.json section: (required, optional, as-types)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## results.json\n", 1)[1].split("\n## ", 1)[0]
    bullets: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        m = _BULLET.match(line)
        if m:
            name = m.group(1)
            assert name not in bullets, f"README results.json: {name} twice"
            bullets[name] = m.group(2)
        elif name and line.startswith("  "):
            bullets[name] += " " + line.strip()
        else:
            name = None
    out = {}
    for name, body in bullets.items():
        required, _, optional = body.partition("*optional*")
        out[name] = (set(_KEY.findall(required)), set(_KEY.findall(optional)), _AS.findall(body))
    return out


def _reachable(tp: Any, seen: dict[str, Any]) -> dict[str, Any]:
    """Every TypedDict ``tp`` refers to, by name."""
    if is_typeddict(tp):
        if tp.__name__ in seen:
            return seen
        seen[tp.__name__] = tp
        for hint in typing.get_type_hints(tp).values():
            _reachable(hint, seen)
    for arg in typing.get_args(tp):
        _reachable(arg, seen)
    return seen


def test_the_readme_documents_every_key_of_the_contract_and_no_other() -> None:
    documented = _readme_section()
    typed = _reachable(contract.Results, {})
    assert sorted(documented) == sorted(typed), "README results.json: bullets vs TypedDicts"
    for name, tp in typed.items():
        required, optional, bases = documented[name]
        for base in bases:
            required |= documented[base][0]
            optional |= documented[base][1]
        assert (sorted(required), sorted(optional)) == (
            sorted(tp.__required_keys__),
            sorted(tp.__optional_keys__),
        ), f"README results.json: {name} (keys before *optional* are required, after optional)"
