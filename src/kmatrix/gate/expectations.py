"""Expectations: facts a release relies on, declared in matrix.yaml and checked against results.

One expectation is one line of text, so that matrix.yaml reads like the facts it guards::

    memfd-write VmRSS_delta < 1 MiB on all kernels
    memfd-over-shm-limit errno == none
    tmpfile-over-shm-limit errno == ENOSPC on >= 5.10
    memfd-write cgroup_shmem_delta >= 90%          # percent of the scenario's size
    oom-global-memfd-unmapped first victim == hog on >= 6.1
    oom-no-killable panic == true on 6.1, 6.12     # cell names

Grammar: ``SCENARIO SUBJECT OP VALUE [on RANGE]``. SUBJECT is a metric (``VmRSS`` or
``VmRSS_delta``), ``errno``, or for OOM experiments ``first victim`` / ``panic``. RANGE is
``all kernels`` (the default), up to two version bounds (``>= 5.10 and < 6.3``, compared with
the release the cell actually ran), or a comma-separated list of cell names.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from kmatrix import catalog
from kmatrix.results.schema import JSON, AnyResults
from kmatrix.results.view import (
    METRICS,
    cell_version,
    first_victims,
    fmt_metric,
    oom_experiment,
    scenario,
)

ACCOUNTING = catalog.SCENARIOS
OOM = catalog.EXPERIMENTS
ROLES = catalog.ROLES
OPS: dict[str, Callable[[int, int], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
UNITS = {"": 1, "b": 1, "kib": 1024, "k": 1024, "mib": 1024**2, "m": 1024**2, "gib": 1024**3}
UNITS["g"] = 1024**3

_OP = r"<=|>=|==|!=|<|>"
_LINE_RE = re.compile(
    rf"^(?P<scenario>\S+)\s+(?P<subject>first\s+victim|\S+?)\s*(?P<op>{_OP})\s*"
    rf"(?P<value>.+?)(?:\s+on\s+(?P<range>.+))?$"
)
_NUMBER_RE = re.compile(r"^(?P<num>-?\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*|%)$")
_BOUND_RE = re.compile(rf"^(?P<op>{_OP})\s*(?P<version>\d+(?:\.\d+){{0,2}})$")

Kind = Literal["metric", "errno", "victim", "panic"]


class ExpectationSyntaxError(ValueError):
    """An expectation that cannot be parsed; the message names it and the fix."""


@dataclass(frozen=True)
class Expectation:
    """One parsed expectation."""

    text: str
    scenario: str
    kind: Kind
    subject: str  # metric key (``VmRSS_delta``), "errno", "first victim" or "panic"
    op: str
    value: int | str | bool  # bytes/points, errno or role name, or a panic flag
    percent: bool = False  # value is a percentage of the scenario's size_bytes
    bounds: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    cells: tuple[str, ...] = ()  # explicit cell names; empty with no bounds: all kernels


def parse_expectation(text: str) -> Expectation:
    """Parse one expectation line; raise ExpectationSyntaxError naming it and the fix."""
    try:
        return _parse(text.strip())
    except ExpectationSyntaxError as exc:
        raise ExpectationSyntaxError(f"expectation {text.strip()!r}: {exc}") from None


def _parse(text: str) -> Expectation:
    m = _LINE_RE.match(text)
    if not m:
        raise ExpectationSyntaxError(
            "expected 'SCENARIO METRIC OP VALUE [on RANGE]', e.g. "
            "'memfd-write VmRSS_delta < 1 MiB on all kernels'"
        )
    name, subject, op = m["scenario"], " ".join(m["subject"].split()), m["op"]
    _check_name(name)
    kind, subject = _subject(name, subject)
    value, percent = _value(kind, subject, op, m["value"].strip())
    bounds, cells = _range(m["range"])
    return Expectation(text, name, kind, subject, op, value, percent, bounds, cells)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_name(name: str) -> None:
    if name not in ACCOUNTING + OOM:
        hint = _suggest(name, ACCOUNTING + OOM) or f" (known: {', '.join(ACCOUNTING + OOM)})"
        raise ExpectationSyntaxError(f"unknown scenario {name!r}{hint}")


def _subject(name: str, subject: str) -> tuple[Kind, str]:
    if name in OOM:
        if subject in ("first victim", "panic"):
            return ("victim" if subject == "first victim" else "panic"), subject
        raise ExpectationSyntaxError(
            f"{name} is an OOM experiment: check 'first victim' or 'panic', not {subject!r}"
        )
    if subject == "errno":
        return "errno", subject
    key = subject if subject.endswith("_delta") else f"{subject}_delta"
    if key.removesuffix("_delta") not in METRICS:
        known = [f"{m}_delta" for m in METRICS]
        hint = _suggest(key, known) or f" (metrics: {', '.join(known)}, or errno)"
        raise ExpectationSyntaxError(f"unknown metric {subject!r}{hint}")
    return "metric", key


def _value(kind: Kind, subject: str, op: str, raw: str) -> tuple[int | str | bool, bool]:
    if kind != "metric" and op not in ("==", "!="):
        raise ExpectationSyntaxError(f"{subject} can only be compared with == or !=, not {op}")
    if kind == "errno":
        if raw.lower() == "none" or re.fullmatch(r"E[A-Z0-9]+", raw):
            return ("none" if raw.lower() == "none" else raw), False
        raise ExpectationSyntaxError(
            f"errno value {raw!r}: use an errno name such as ENOSPC, or none"
        )
    if kind == "victim":
        if raw in ROLES:
            return raw, False
        raise ExpectationSyntaxError(
            f"victim {raw!r}{_suggest(raw, ROLES)}: use {', '.join(ROLES)}"
        )
    if kind == "panic":
        flags = {"true": True, "yes": True, "false": False, "no": False}
        if raw.lower() in flags:
            return flags[raw.lower()], False
        raise ExpectationSyntaxError(f"panic value {raw!r}: use true or false")
    return _number(subject, raw)


def _number(subject: str, raw: str) -> tuple[int, bool]:
    m = _NUMBER_RE.match(raw)
    if not m:
        raise ExpectationSyntaxError(f"value {raw!r} is not a number such as 1 MiB, 512 KiB or 90%")
    num, unit = float(m["num"]), m["unit"]
    if unit == "%":
        return int(num), True
    if subject == "oom_score_delta":
        if unit:
            raise ExpectationSyntaxError(f"oom_score is in points: drop the unit {unit!r}")
        return int(num), False
    if unit.lower() not in UNITS:
        raise ExpectationSyntaxError(
            f"unknown unit {unit!r}; use B, KiB, MiB, GiB or % (of the scenario's size)"
        )
    return int(num * UNITS[unit.lower()]), False


def _range(
    raw: str | None,
) -> tuple[tuple[tuple[str, tuple[int, int, int]], ...], tuple[str, ...]]:
    text = " ".join((raw or "").split())
    if text in ("", "all", "all kernels", "all cells"):
        return (), ()
    if text[0] in "<>=!":
        bounds = []
        for part in re.split(r"\s+and\s+|\s*,\s*", text):
            m = _BOUND_RE.match(part)
            if not m:
                raise ExpectationSyntaxError(
                    f"kernel range {text!r}: write bounds like '>= 6.1' or '>= 5.10 and < 6.3'"
                )
            nums = [int(x) for x in m["version"].split(".")] + [0, 0]
            bounds.append((m["op"], (nums[0], nums[1], nums[2])))
        return tuple(bounds), ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", n)]
    if bad or not names:
        raise ExpectationSyntaxError(
            f"kernel range {text!r}: use 'all kernels', version bounds such as '>= 6.1', "
            "or cell names separated by commas"
        )
    return (), names


# --- evaluation -------------------------------------------------------------------------

Result = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class Outcome:
    """One expectation evaluated on one cell."""

    expectation: Expectation
    cell: str
    result: Result
    observed: str
    why: str = ""  # for failures and skips: what happened, in words

    def describe(self) -> str:
        """One line for a terminal or a CI log."""
        exp = self.expectation
        text = f"{exp.text} — cell {self.cell}: observed {self.observed}"
        return text + (f" ({self.why})" if self.why else "")


def expected_text(exp: Expectation) -> str:
    """The right-hand side as a reader would write it."""
    if exp.kind == "metric" and not exp.percent:
        assert isinstance(exp.value, int)
        unit = "" if exp.subject == "oom_score_delta" else " MiB"
        return f"{exp.op} {fmt_metric(exp.subject, exp.value)}{unit}"
    return f"{exp.op} {exp.value}{'%' if exp.percent else ''}"


def _in_range(exp: Expectation, cell: JSON) -> bool | None:
    if exp.cells:
        return cell.get("id") in exp.cells
    if not exp.bounds:
        return True
    version = cell_version(cell)
    if version is None:
        return None
    return all(OPS[op](version, bound) for op, bound in exp.bounds)  # type: ignore[arg-type]


def evaluate_cell(exp: Expectation, cell: JSON) -> Outcome:
    """Evaluate one expectation on one cell."""
    cid = str(cell.get("id"))
    in_range = _in_range(exp, cell)
    if in_range is False:
        return Outcome(exp, cid, "skip", "—", "cell not in the expectation's kernel range")
    status = cell.get("status")
    if status == "skipped":
        return Outcome(exp, cid, "skip", "—", f"cell skipped: {cell.get('reason') or 'no reason'}")
    if in_range is None:
        return Outcome(exp, cid, "fail", "—", "the kernel version this cell ran is not recorded")
    if status != "ok":
        return Outcome(
            exp, cid, "fail", "—", f"cell did not run: {status} {cell.get('reason') or ''}".rstrip()
        )
    if exp.kind in ("victim", "panic"):
        return _evaluate_oom(exp, cell, cid)
    return _evaluate_scenario(exp, cell, cid)


def _evaluate_scenario(exp: Expectation, cell: JSON, cid: str) -> Outcome:
    sc = scenario(cell, exp.scenario)
    if sc is None:
        return Outcome(exp, cid, "fail", "—", f"{exp.scenario} was not measured in this cell")
    if exp.kind == "errno":
        errno = sc.get("errno") or "none"
        ok = (errno == exp.value) == (exp.op == "==")
        return Outcome(exp, cid, "pass" if ok else "fail", str(errno))
    value = (sc.get("metrics") or {}).get(exp.subject)
    if not isinstance(value, int):
        why = sc.get("error") or f"{exp.subject} not recorded"
        return Outcome(exp, cid, "fail", "—", str(why))
    assert isinstance(exp.value, int)
    limit = exp.value
    observed = fmt_metric(exp.subject, value) + ("" if exp.subject == "oom_score_delta" else " MiB")
    if exp.percent:
        size = sc.get("size_bytes")
        if not isinstance(size, int) or size <= 0:
            return Outcome(exp, cid, "fail", observed, "scenario size unknown, cannot apply %")
        limit = size * exp.value // 100
        observed += f" ({value * 100 // size}% of {fmt_metric('size', size)} MiB)"
    ok = OPS[exp.op](value, limit)
    return Outcome(exp, cid, "pass" if ok else "fail", observed)


def _evaluate_oom(exp: Expectation, cell: JSON, cid: str) -> Outcome:
    run = oom_experiment(cell, exp.scenario)
    if run is None:
        return Outcome(exp, cid, "fail", "—", f"{exp.scenario} was not run in this cell")
    status = run.get("status")
    if status in ("skipped", "refused"):
        # Deliberate: e.g. docker cells refuse global OOMs, which would hit the host itself.
        return Outcome(exp, cid, "skip", "—", f"experiment {status}: {run.get('reason') or ''}")
    if status not in (None, "ok"):
        return Outcome(exp, cid, "fail", "—", f"experiment {status}: {run.get('reason') or ''}")
    if exp.kind == "panic":
        panic = run.get("panic")
        panic = any(panic) if isinstance(panic, list) else panic
        if not isinstance(panic, bool):
            return Outcome(exp, cid, "fail", "—", "panic not recorded")
        ok = (panic == exp.value) == (exp.op == "==")
        return Outcome(exp, cid, "pass" if ok else "fail", str(panic).lower())
    firsts = first_victims(run)
    if not firsts:
        # Nothing ran: neither "== X" nor "!= X" may pass on no evidence.
        return Outcome(exp, cid, "fail", "—", "no repeat recorded a first victim: not evaluated")
    if exp.op == "==":
        ok = all(v == exp.value for v in firsts)
    else:
        ok = all(v != exp.value for v in firsts)
    return Outcome(exp, cid, "pass" if ok else "fail", f"first victims {', '.join(firsts)}")


def evaluate(
    expectations: Sequence[Expectation], results: AnyResults, ran: Sequence[str] | None = None
) -> list[Outcome]:
    """Every expectation on every cell of a results document, in declaration order.

    An expectation can never pass vacuously: a cell it names that is missing from the
    results (and was meant to run: ``ran`` lists the cells of a partial run; None means
    all) fails as "not evaluated", and so does one naming cells none of which produced a
    pass or a fail.
    """
    cells = results.get("cells") or []
    present = {str(c.get("id")) for c in cells}
    out: list[Outcome] = []
    for exp in expectations:
        mine = [evaluate_cell(exp, cell) for cell in cells]
        for name in exp.cells:
            if name not in present and (ran is None or name in ran):
                why = "cell not in the results: not evaluated"
                mine.append(Outcome(exp, name, "fail", "—", why))
        named = [o for o in mine if o.cell in exp.cells]
        if exp.cells and named and all(o.result == "skip" for o in named):
            why = "; ".join(sorted({o.why for o in named}))
            mine.append(Outcome(exp, ",".join(exp.cells), "fail", "—", f"not evaluated: {why}"))
        out += mine
    return out
