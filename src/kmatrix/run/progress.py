"""Progress of a matrix run: a live status line on a terminal, plain log lines otherwise."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO


class Progress:
    """Thread-safe progress reporting for cells running in parallel.

    Every phase change is printed as one line with the elapsed run time (what CI logs keep);
    on a terminal, a status line below them shows each running cell, its phase and how long
    it has been in it, refreshed every second.
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._phases: dict[str, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.live:
            self._thread = threading.Thread(target=self._refresh, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            self._clear_status()

    def log(self, message: str) -> None:
        """Print one line, prefixed with the elapsed run time."""
        with self._lock:
            self._clear_status()
            self.stream.write(f"[{time.monotonic() - self.start:6.1f}s] {message}\n")
            self._draw_status()
            self.stream.flush()

    def phase(self, cell: str, phase: str) -> None:
        """A cell entered a new phase (fetch, build, boot, ...)."""
        with self._lock:
            self._phases[cell] = (phase, time.monotonic())
        self.log(f"{cell}: {phase}")

    def finish(self, cell: str, message: str) -> None:
        """A cell is done; it leaves the status line."""
        with self._lock:
            self._phases.pop(cell, None)
        self.log(f"{cell}: {message}")

    def status_line(self) -> str:
        """The live status text: every running cell with its phase and time in it."""
        now = time.monotonic()
        parts = [f"{c} {p} {now - t:.0f}s" for c, (p, t) in sorted(self._phases.items())]
        return " | ".join(parts)

    def _clear_status(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")

    def _draw_status(self) -> None:
        if self.live and self._phases:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write(self.status_line()[:width])

    def _refresh(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                self._clear_status()
                self._draw_status()
                self.stream.flush()
