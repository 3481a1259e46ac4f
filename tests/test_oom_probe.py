"""Host tests of the probe's OOM pieces that need no OOM: plans, the badness model, sizes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "probes"))

import oom
import oom_growth
import oom_harness
import oom_model
import oom_scope
import oom_watch
from kmatrix.cells.oom_guest import plan_arg
from kmatrix.results.oom import EXPERIMENTS, Unit

PAGE = 4096
MIB = 1 << 20


def test_host_and_probe_agree_on_the_experiments() -> None:
    assert set(oom.EXPERIMENTS) == set(EXPERIMENTS)


def test_the_catalog_names_every_scenario_experiment_and_role() -> None:
    """probes/catalog.py is the one list: the probe's registries use exactly its names."""
    import scenarios
    from kmatrix import catalog

    assert tuple(scenarios.SCENARIOS) == catalog.SCENARIOS  # same order: the run order
    assert set(oom.EXPERIMENTS) == set(catalog.EXPERIMENTS)
    env = oom.Env(256 * MIB, PAGE, "/dev/shm", "/sys/fs/cgroup", 30.0, 1)
    roles = {
        r.role
        for e in oom.EXPERIMENTS.values()
        if e.holder != "cross"
        for r in oom_harness.role_specs(e, env, oom_scope.Scope(), oom.role_sizes(e, env))
    }
    roles |= {"creator", "receiver", "hog"}  # oom_cross's, forked by their own module
    assert roles | {"none"} == set(catalog.ROLES)


def test_run_order_takes_v1_first_and_ends_with_the_panic() -> None:
    order = list(oom.EXPERIMENTS)
    assert order[0] == "oom-memcg-v1"  # before v2 enables +memory (oom_scope)
    assert order[-1] == "oom-no-killable"  # its panic ends the boot


def test_parse_plan_all_and_ranges() -> None:
    assert len(oom.parse_plan("all", 3)) == 3 * len(oom.EXPERIMENTS)
    plan = oom.parse_plan("oom-no-killable:1-2,oom-global-memfd-unmapped,oom-memcg-v1:0", 3)
    assert plan == [
        ("oom-memcg-v1", 0),
        ("oom-global-memfd-unmapped", 0),
        ("oom-global-memfd-unmapped", 1),
        ("oom-global-memfd-unmapped", 2),
        ("oom-no-killable", 1),
        ("oom-no-killable", 2),
    ]
    with pytest.raises(ValueError, match="unknown OOM experiment 'oom-nope'"):
        oom.parse_plan("oom-nope", 3)


def test_host_plan_argument_round_trips_through_the_probe() -> None:
    units = [Unit("oom-no-killable", 1), Unit("oom-no-killable", 2), Unit("oom-memcg-v2", 0)]
    units.append(Unit("oom-memcg-v2", 2))
    arg = plan_arg(units)
    assert arg == "oom-no-killable:1-2,oom-memcg-v2:0-0,oom-memcg-v2:2-2"
    assert sorted(oom.parse_plan(arg, 3)) == sorted((u.name, u.repeat) for u in units)


def _snap(rss_mib: int, adj: int = 0, pte_kib: int = 100) -> dict[str, int]:
    return {
        "VmRSS": rss_mib * MIB, "RssAnon": rss_mib * MIB, "RssFile": 0, "RssShmem": 0,
        "VmPTE": pte_kib * 1024, "VmSwap": 0, "oom_score": 0, "oom_score_adj": adj,
    }  # fmt: skip


def test_badness_is_rss_plus_page_tables_plus_adjustment() -> None:
    total = 40000
    assert oom_model.badness(_snap(10, pte_kib=40), total, PAGE) == 2560 + 10
    assert oom_model.badness(_snap(10, adj=500, pte_kib=0), total, PAGE) == 2560 + 500 * 40
    assert oom_model.badness(_snap(10, adj=-1000), total, PAGE) is None


def test_predict_skips_unkillable_and_picks_the_biggest() -> None:
    snaps = {"holder": _snap(50, adj=-1000), "bystander": _snap(5), "hog": _snap(30)}
    victim, points = oom_model.predict(snaps, 40000, PAGE)
    assert victim == "hog" and points["holder"] is None
    assert oom_model.predict({"holder": _snap(1, adj=-1000)}, 40000, PAGE)[0] is None


def test_snapshot_of_this_process_and_of_a_missing_one() -> None:
    snap = oom_model.snapshot(os.getpid())
    assert snap is not None and snap["VmRSS"] > 0 and "oom_score" in snap
    assert oom_model.snapshot(2**22 + 12345) is None


def test_open_proc_files_follow_a_process_without_reopening_until_it_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """oom_model.ProcOf: what the harness reads while memory runs out, opened once."""
    import builtins
    import mmap

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that maps 32 MiB when told to, then waits
        os.close(w)  # so that the parent's end closing ends it, whatever the test did
        os.read(r, 1)
        keep = mmap.mmap(
            -1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        )
        os.read(r, 1)
        del keep
        os._exit(0)
    proc = oom_model.ProcOf(pid)
    # From here on no file may be opened by path: each snapshot reads the open ones.
    monkeypatch.setattr(os, "open", lambda *a, **k: pytest.fail(f"os.open{a}"))
    monkeypatch.setattr(builtins, "open", lambda *a, **k: pytest.fail(f"open{a}"))
    try:
        fds = len(os.listdir("/proc/self/fd"))
        before = proc.snapshot()
        os.write(w, b"g")
        deadline = time.monotonic() + 10
        after = proc.snapshot()
        while after is not None and after["RssAnon"] - (before or after)["RssAnon"] < 30 << 20:
            assert time.monotonic() < deadline, after
            time.sleep(0.05)
            after = proc.snapshot()
        assert before and after and len(os.listdir("/proc/self/fd")) == fds
        os.write(w, b"x")
        os.waitpid(pid, 0)
        assert proc.snapshot() is None  # reaped: the open files no longer read
    finally:
        monkeypatch.undo()
        proc.close()
        os.close(r)
        os.close(w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_sizes_keep_the_roles_in_order() -> None:
    env = oom.Env(256 * MIB, PAGE, "/dev/shm", "/sys/fs/cgroup", 30.0, 1)
    for exp in oom.EXPERIMENTS.values():
        sizes = oom.role_sizes(exp, env)
        assert ("limit" in sizes) == (exp.scope != "global")
        if exp.growth:  # three bystanders of different sizes; the writer has only a cap
            sizes_by = [sizes[r] for r in oom_growth.BYSTANDERS]
            assert sizes_by == sorted(sizes_by) and len(set(sizes_by)) == 3
            assert sizes_by[0] > 16 * MIB  # clearly larger than the writer's own RSS
            assert sizes["writer"] >= 2 * sizes.get("limit", env.mem_total)
            continue
        assert sizes["holder"] > 5 * sizes["bystander"] > 0
        assert sizes["hog"] >= env.mem_total  # the hog only stops at an OOM


def test_the_stall_window_is_recorded_where_it_decides_an_outcome() -> None:
    """writer-stalled against a later write() error is the harness's window: each growth
    repeat records it; the other experiments, which never judge a stall, record none."""
    import oom_repeat

    env = oom.Env(256 * MIB, PAGE, "/dev/shm", "/sys/fs/cgroup", 30.0, 1)
    for exp in oom.EXPERIMENTS.values():
        window = oom_repeat.new_record(exp, 0, env)["stall_after_s"]
        assert window == (oom_growth.STALL_S if exp.growth else None), exp.name


def _starve_one_wait(
    monkeypatch: pytest.MonkeyPatch, starve_s: float, nth: int, ready_only: bool
) -> None:
    """Make the watch's ``nth`` wait (counting only those that found a line, with
    ``ready_only``) end ``starve_s`` late: the harness left off the CPU after it."""
    real, calls = oom_watch.select.select, [0]

    def starved(*args: float) -> object:
        found = real(*args)
        if found[0] or not ready_only:
            calls[0] += 1
            if calls[0] == nth:
                time.sleep(starve_s)
        return found

    monkeypatch.setattr(oom_watch.select, "select", starved)


def _watch_a_silent_writer(
    monkeypatch: pytest.MonkeyPatch, starve_s: float
) -> tuple[oom_watch.Watch, float]:
    """A "writer" that never reports progress (an anon role, never told to go: it holds its
    memory and waits), watched with a 1 s stall window; the watch's second wait ends
    ``starve_s`` late -- a guest the host left off its CPU while its timer ran out (the
    guest's clock runs on). The watch and how long it took."""
    from oom_roles import RoleSpec

    start = time.monotonic()
    roles = oom_harness.spawn_all([RoleSpec("writer", "anon", MIB)], _env(), start + 10)
    _starve_one_wait(monkeypatch, starve_s, nth=2, ready_only=False)
    try:
        begin = time.monotonic()
        seen = oom_watch.watch(roles, begin, begin + 10, stall_s=1.0)
        return seen, time.monotonic() - begin
    finally:
        monkeypatch.undo()
        oom_harness.kill_all(roles)


def test_a_stall_counts_only_the_time_the_harness_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that goes quiet while the harness itself is not running (the host left the
    guest off its CPU, as an oversubscribed TCG host does) is not stalled for that time:
    the watch ends after 1 s of the harness's own running time, and the evidence says how
    long the harness did not run."""
    calm, took = _watch_a_silent_writer(monkeypatch, 0.0)
    assert calm.outcome == "writer-stalled" and calm.stall is not None
    assert calm.stall["harness_late_s"] == 0.0 and 1.0 <= took < 1.0 + oom_watch.LATE_S
    assert calm.longest_quiet_s is None  # it never said anything: no spell it went on from
    starved, took = _watch_a_silent_writer(monkeypatch, 1.5)
    assert starved.outcome == "writer-stalled" and starved.stall is not None
    late, quiet = starved.stall["harness_late_s"], starved.stall["no_progress_s"]
    assert isinstance(late, float) and isinstance(quiet, float)
    assert 1.4 <= late < 2.0 and quiet - late >= 0.95
    # Not judged stalled on waking (1.75 s after the last word) but 1 s of its own time later.
    assert took >= 2.4


def _env() -> oom.Env:
    return oom.Env(256 * MIB, PAGE, "/dev/shm", "/sys/fs/cgroup", 10.0, os.open(os.devnull, 1))


def _paced_writer(pauses: list[float], done: bool = True) -> oom_harness.Role:
    """A forked "writer" that sends a progress line after each pause, then "done" and waits
    for its command pipe to close (or, with ``done`` False, exits 0.6 s later: a death)."""
    from messages import Channel

    r, w = os.pipe()
    cmd_r, cmd_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(r)
        for i, pause in enumerate(pauses):
            time.sleep(pause)
            os.write(w, json.dumps({"progress": i * MIB}).encode() + b"\n")
        if not done:
            time.sleep(0.6)  # quiet, then dead: not a spell it went on from
            os._exit(0)
        os.write(w, b'{"done": true}\n')
        os.read(cmd_r, 1)
        os._exit(0)
    os.close(w)
    os.close(cmd_r)
    return oom_harness.Role("writer", pid, cmd_w, Channel(r))


def _watch_paced(
    monkeypatch: pytest.MonkeyPatch, pauses: list[float], done: bool = True, starve_s: float = 0.0
) -> oom_watch.Watch:
    """Watch a paced writer with a 1 s stall window; with ``starve_s``, the wait that returns
    its third line ends that much later (the harness off the CPU, the line waiting)."""
    role = _paced_writer(pauses, done)
    _starve_one_wait(monkeypatch, starve_s, nth=3, ready_only=True)
    try:
        begin = time.monotonic()
        return oom_watch.watch([role], begin, begin + 10, stall_s=1.0)
    finally:
        monkeypatch.undo()
        oom_harness.kill_all([role])


def test_the_longest_quiet_spell_of_a_writer_that_went_on_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stall window's margin: a writer quiet for 0.6 s and then going on is not
    stalled under a 1 s window, and the watch records that spell as its longest quiet
    (less by however late the harness read the line before it)."""
    seen = _watch_paced(monkeypatch, [0.05, 0.1, 0.6, 0.05])
    assert seen.outcome == "writer-done" and seen.stall is None
    assert seen.longest_quiet_s is not None
    assert 0.6 - oom_watch.LATE_S <= seen.longest_quiet_s < 0.6 + oom_watch.LATE_S


def test_the_longest_quiet_spell_counts_only_time_the_harness_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line that waited while the harness was off the CPU for 1.2 s does not make a
    0.1 s spell look longer than the stall window; nor does the quiet before a death."""
    seen = _watch_paced(monkeypatch, [0.05, 0.05, 0.1, 0.05], starve_s=1.2)
    assert seen.outcome == "writer-done" and seen.longest_quiet_s is not None
    assert seen.longest_quiet_s < 1.0  # the window (counting the starvation: ~1.3 s)
    dying = _watch_paced(monkeypatch, [0.05, 0.05, 0.05], done=False)
    assert dying.outcome == "writer-died" and dying.longest_quiet_s is not None
    assert dying.longest_quiet_s < 0.05 + oom_watch.LATE_S


def test_watch_a_hog_that_finds_no_oom_and_a_repeat_that_hangs() -> None:
    """Real forked roles on the host, far below any OOM: the two ways a repeat can end
    without one. The hog says "hog_done" at its cap; a role that never dies (and no hog)
    ends at the per-repeat deadline, so a hung experiment costs only itself."""
    from oom_roles import RoleSpec

    env = _env()
    start = time.monotonic()
    specs = [RoleSpec("holder", "anon", MIB), RoleSpec("hog", "hog", 8 * MIB)]
    roles = oom_harness.spawn_all(specs, env, start + 10)
    try:
        # go=True: the harness runs its watch code once, then tells the driver to start.
        seen = oom_watch.watch(roles, start, start + 10, go=True)
        assert seen.outcome == "hog-done" and seen.hog_bytes == 8 * MIB
        assert seen.snapshot is not None and set(seen.snapshot) == {"holder", "hog"}
        assert seen.snapshot["hog"]["RssAnon"] >= 8 * MIB
    finally:
        oom_harness.kill_all(roles)
    roles = oom_harness.spawn_all([RoleSpec("holder", "anon", MIB)], env, time.monotonic() + 10)
    try:
        begin = time.monotonic()
        seen = oom_watch.watch(roles, begin, begin + 0.5)
        assert seen.outcome == "timeout" and seen.deaths == []
        assert time.monotonic() - begin < 3
    finally:
        oom_harness.kill_all(roles)
    assert oom_harness.exit_signals(roles) == {}  # all reaped by _kill_all
