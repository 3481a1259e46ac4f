"""QEMU slots: the heaviest waiting boot starts first; an interrupted wait takes no slot."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from kmatrix.backends.slots import Slots


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
