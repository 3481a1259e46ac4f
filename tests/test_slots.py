"""QEMU slots: the heaviest waiting boot starts first; an interrupted wait takes no slot; the
cap each cell records (qemu_slots)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from kmatrix.backends import qemu
from kmatrix.backends.slots import Slots
from kmatrix.run.in_docker import RUNNER_SLOTS, runner_slots_env


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_waiters_start_heaviest_first_then_in_arrival_order() -> None:
    slots = Slots(1)
    assert slots.acquire(0, lambda: False)
    order: list[str] = []

    def wait(name: str, weight: float) -> None:
        assert slots.acquire(weight, lambda: False, poll_s=0.01)
        order.append(name)
        slots.release()

    threads = []
    for name, weight in (("panic-1", 1), ("main", 43), ("panic-2", 1), ("accounting", 34)):
        t = threading.Thread(target=wait, args=(name, weight))
        t.start()
        threads.append(t)
        _wait_for(lambda: len(slots._waiting) == len(threads), f"{name} queued")
    slots.release()
    for t in threads:
        t.join(5)
    assert order == ["main", "accounting", "panic-1", "panic-2"]


def test_two_free_slots_go_to_two_waiters() -> None:
    slots = Slots(2)
    assert slots.acquire(1, lambda: False)
    assert slots.acquire(1, lambda: False)
    got = threading.Event()
    t = threading.Thread(target=lambda: slots.acquire(5, lambda: False, 0.01) and got.set())
    t.start()
    assert not got.wait(0.2)  # both slots taken
    slots.release()
    assert got.wait(5)
    t.join(5)


def test_giving_up_takes_no_slot_and_lets_the_next_waiter_go() -> None:
    slots = Slots(1)
    assert slots.acquire(0, lambda: False)
    stop = threading.Event()
    result: list[bool] = []
    heavy = threading.Thread(target=lambda: result.append(slots.acquire(9, stop.is_set, 0.01)))
    heavy.start()
    _wait_for(lambda: len(slots._waiting) == 1, "heavy queued")
    light_got = threading.Event()
    light = threading.Thread(
        target=lambda: slots.acquire(1, lambda: False, 0.01) and light_got.set()
    )
    light.start()
    _wait_for(lambda: len(slots._waiting) == 2, "light queued")
    stop.set()
    heavy.join(5)
    assert result == [False]
    slots.release()  # the one slot: it must reach the light waiter, not vanish
    assert light_got.wait(5)
    light.join(5)


def test_an_exception_in_the_wait_leaves_no_stale_ticket() -> None:
    """Ctrl-C (KeyboardInterrupt) while waiting: the ticket goes, so the rest can start."""
    slots = Slots(1)
    assert slots.acquire(0, lambda: False)

    def interrupted() -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        slots.acquire(9, interrupted, 0.01)
    assert slots._waiting == []
    slots.release()
    assert slots.acquire(1, lambda: False, 0.01)


def test_set_parallel_takes_the_environment_s_cap_and_at_least_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runner container's KMATRIX_QEMU_SLOTS wins over --jobs; no cap is below one."""
    monkeypatch.delenv(qemu.MACHINE_SLOTS_ENV, raising=False)
    monkeypatch.setattr(qemu, "_SLOTS", Slots(3))
    monkeypatch.setenv(qemu.SLOTS_ENV, "2")
    qemu.set_parallel(7)
    assert qemu.slot_count() == 2
    monkeypatch.setenv(qemu.SLOTS_ENV, "0")
    qemu.set_parallel(7)
    assert qemu.slot_count() == 1
    monkeypatch.delenv(qemu.SLOTS_ENV)
    qemu.set_parallel(7)
    assert qemu.slot_count() == 7


def test_setting_the_same_cap_again_keeps_the_boots_that_hold_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cells in threads of one process each set the cap: the second must not hand out a
    fresh set of slots beside the ones the first cell's boots hold."""
    monkeypatch.delenv(qemu.SLOTS_ENV, raising=False)
    monkeypatch.setattr(qemu, "_SLOTS", Slots(3))
    qemu.set_parallel(2)
    held = qemu._SLOTS
    assert held.acquire(0, lambda: False) and held.acquire(0, lambda: False)
    qemu.set_parallel(2)
    assert qemu._SLOTS is held
    assert not qemu._SLOTS.acquire(0, lambda: True)  # both taken: a third boot waits


def test_a_runner_records_the_whole_run_s_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a runner container the cells record every runner's QEMUs (in_docker.py), not the
    container's own two: three runners at once let six guests compete for the CPU."""
    env = runner_slots_env(3)
    assert env == {qemu.SLOTS_ENV: str(RUNNER_SLOTS), qemu.MACHINE_SLOTS_ENV: "6"}
    monkeypatch.setattr(qemu, "_SLOTS", Slots(RUNNER_SLOTS))
    monkeypatch.setenv(qemu.MACHINE_SLOTS_ENV, env[qemu.MACHINE_SLOTS_ENV])
    assert qemu.slot_count() == 6
    monkeypatch.delenv(qemu.MACHINE_SLOTS_ENV)
    assert qemu.slot_count() == RUNNER_SLOTS
