"""How many QEMUs run at once, and which waiting one starts next: the heaviest first.

TCG guests are CPU-bound, so a run starts no more QEMUs than it has slots (one per core by
default). Which waiting boot gets a free slot decides the wall time: a cell's accounting
boot and its main OOM boot run ~30-45 s, its panicking repeats' boots ~8 s each. Served
in arrival order, the short boots could take the slots first and leave the main OOM boot
to run alone at the end (measured, 6.12 alone: 82 s wall for 120 s of boots on 2 cores);
served heaviest first (longest-processing-time scheduling), the short boots fill the gaps.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable


class Slots:
    """A counting semaphore whose waiters are served by weight, heaviest first, then in
    arrival order."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)  # how many can be held at once
        self._free = self.count
        self._cond = threading.Condition()
        self._waiting: list[tuple[float, int]] = []  # (-weight, arrival): a heap
        self._arrivals = itertools.count()

    def acquire(self, weight: float, give_up: Callable[[], bool], poll_s: float = 0.2) -> bool:
        """Wait for a slot; False (and no slot taken) as soon as ``give_up()`` is true."""
        ticket = (-weight, next(self._arrivals))
        with self._cond:
            heapq.heappush(self._waiting, ticket)
            try:
                while not (self._free and self._waiting[0] == ticket):
                    if give_up():
                        self._leave(ticket)
                        return False
                    self._cond.wait(poll_s)
            except BaseException:  # Ctrl-C in the wait: a stale ticket would block the rest
                self._leave(ticket)
                raise
            heapq.heappop(self._waiting)
            self._free -= 1
            self._cond.notify_all()  # a second free slot goes to the next in line
            return True

    def _leave(self, ticket: tuple[float, int]) -> None:
        """Drop a waiter's ticket (the lock held) and let the next in line go."""
        self._waiting.remove(ticket)
        heapq.heapify(self._waiting)
        self._cond.notify_all()

    def release(self) -> None:
        """Give a slot back."""
        with self._cond:
            self._free += 1
            self._cond.notify_all()
