"""Host tests of the container scope of the memcg OOM experiments (no container, no OOM):
limits, sizes, per-repeat counters, the OOM container's command line, results and report.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "probes"))

import oom
import oom_judge
import oom_model
import oom_run
import oom_scope
from kmatrix.cells import docker as docker_cell
from kmatrix.cells.plan import OomPlan
from kmatrix.report.oom import oom_section
from kmatrix.results.oom import entries_from_probe
from kmatrix.results.schema import parse_probe_output

MIB = 1 << 20
PAGE = 4096


def test_parse_limit_knows_both_spellings_of_no_limit() -> None:
    assert oom_scope.parse_limit("536870912\n") == 512 * MIB
    assert oom_scope.parse_limit("max\n") is None  # v2
    assert oom_scope.parse_limit("9223372036854771712\n") is None  # v1 PAGE_COUNTER_MAX
    assert oom_scope.parse_limit("garbage") is None
    assert oom_scope.parse_limit("0") is None


def test_container_sizes_are_fractions_of_the_limit_not_of_the_host() -> None:
    sizes = oom.container_sizes(512 * MIB)
    assert sizes["limit"] == 512 * MIB
    assert sizes["holder"] == 256 * MIB
    assert sizes["holder"] > 5 * sizes["bystander"] > 0
    # The hog's cap is bounded by the limit (not 2x the host's RAM), yet above it.
    assert 512 * MIB < sizes["hog"] <= 2 * 512 * MIB


def test_every_memcg_experiment_can_size_its_roles_in_a_container(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Docker cells run the memcg experiments in the container's own cgroup: the growth ones
    need their bystanders and writer sized from the limit too (they raised KeyError before)."""
    import oom_harness

    monkeypatch.setattr(oom_scope, "container_limit", lambda root: 512 * MIB)
    env = oom.Env(8 << 30, PAGE, "/dev/shm", "/sys/fs/cgroup", 30.0, 1, memcg="container")
    for exp in oom.EXPERIMENTS.values():
        if exp.scope == "global" or exp.holder == "cross":
            continue
        sizes = oom.role_sizes(exp, env)
        assert sizes["limit"] == 512 * MIB, exp.name
        specs = oom_harness.role_specs(exp, env, oom_scope.Scope(), sizes)
        assert all(0 < spec.size <= 2 * 512 * MIB for spec in specs), exp.name


def test_events_delta_counts_this_repeat_and_keeps_flags() -> None:
    before = {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 2}
    after = {"oom_kill_disable": 0, "under_oom": 1, "oom_kill": 3}
    delta = oom_judge.events_delta(before, after)
    assert delta == {"oom_kill_disable": 0, "under_oom": 1, "oom_kill": 1}
    assert oom_judge.events_delta({}, {"oom": 1, "oom_kill": 1}) == {"oom": 1, "oom_kill": 1}


def test_raised_role_adjustment_keeps_the_order_and_never_prefers_the_harness() -> None:
    """oom_badness(): points = rss + pte + adj * totalpages / 1000. The same +500 for every
    role leaves their order unchanged; the harness (adj 0) needs RSS > totalpages / 2 to
    outrank even a role with no RSS at all."""
    total = 512 * MIB // PAGE

    def snap(rss_mib: int, adj: int) -> dict[str, int]:
        return {"VmRSS": rss_mib * MIB, "VmPTE": 0, "VmSwap": 0, "oom_score_adj": adj}

    roles = {"holder": 14, "bystander": 25, "hog": 120}
    plain = {r: oom_model.badness(snap(m, 0), total, PAGE) for r, m in roles.items()}
    raised = {
        r: oom_model.badness(snap(m, oom_run.CONTAINER_ROLE_ADJ), total, PAGE)
        for r, m in roles.items()
    }
    assert sorted(plain, key=plain.__getitem__) == sorted(raised, key=raised.__getitem__)
    harness = oom_model.badness(snap(200, 0), total, PAGE)  # a very fat harness
    assert harness is not None
    assert all(p is not None and p > harness for p in raised.values())
    snaps = {r: snap(m, oom_run.CONTAINER_ROLE_ADJ) for r, m in roles.items()}
    assert oom_model.predict(snaps | {"harness": snap(16, 0)}, total, PAGE)[0] == "hog"


def test_oom_container_command_runs_in_its_own_cgroup_with_the_matrix_repeats() -> None:
    oom = OomPlan(units=(), repeats=5, timeout_s=30, memory_bytes=192 * MIB)
    argv = docker_cell.probe_command(["oom-memcg-v1"], 64 * MIB, 120, oom)
    assert argv[argv.index("--oom-memcg") + 1] == "container"
    assert argv[argv.index("--oom-repeats") + 1] == "5"
    assert argv[argv.index("--oom-timeout") + 1] == "30"
    assert "--oom-memcg" not in docker_cell.probe_command(["memfd-write"], 64 * MIB, 120)


def _line(record: dict[str, object]) -> str:
    text = json.dumps(record, separators=(",", ":"))
    return f"KMX1 {text} {zlib.crc32(text.encode()):08x}"


def _result(repeat: int, victims: list[str]) -> dict[str, object]:
    return {
        "type": "oom", "event": "result", "name": "oom-memcg-v1", "repeat": repeat,
        "status": "ok", "error": None, "scope": "v1", "memcg": "container",
        "oom_score_adj": {"harness": 0, "roles": 500},
        "pids": {"holder": 7, "bystander": 8, "hog": 9},
        "cgroup": {"version": "v1", "events": {"oom_kill": len(victims)}},
        "probe_victims": victims, "predicted_victim": "hog",
    }  # fmt: skip


def test_container_entries_say_the_victims_are_the_probes_observation() -> None:
    lines = [_line({"type": "hello", "release": "x"})]
    lines += [_line(_result(0, ["hog"])), _line(_result(1, []))]
    lines.append(_line({"type": "done", "scenarios": 0, "oom": 2}))
    (entry,) = entries_from_probe(parse_probe_output(lines))
    assert entry["status"] == "ok" and entry["repeats"] == 2
    assert entry["victims"] == [["hog"], []]
    assert entry["memory_events_oom_kill"] == [1, 0]
    assert entry["victims_source"] == "probe"
    assert {r["victims_source"] for r in entry["runs"]} == {"probe"}
    assert entry["memcg"] == "container" and entry["cgroup_version"] == "v1"
    assert entry["oom_score_adj"] == {"harness": 0, "roles": 500}
    text = oom_section([{"id": "host", "oom": [entry]}])
    assert "container's own v1 memory cgroup" in text and "oom_score_adj 500" in text
