"""The state of one matrix run: its results document, where it is written, shared resources."""

from __future__ import annotations

import datetime as dt
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kmatrix import __version__
from kmatrix.backends import qemu
from kmatrix.config import Kernel, Matrix
from kmatrix.debian.archive import Archive, default_cache_dir
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.userland import Userland, probe_sha256
from kmatrix.report.dirs import disk_errors, usable_cache
from kmatrix.report.markdown import write_report
from kmatrix.results.cache import CellCache
from kmatrix.results.contract import Cell, HostInfo, Results
from kmatrix.results.schema import SCHEMA_VERSION, write_results
from kmatrix.run.progress import Progress


@dataclass(frozen=True)
class RunOptions:
    """What `invoke matrix` was asked to do."""

    matrix_path: Path = Path("matrix.yaml")  # of the working directory, like reports/
    name: str = "latest"
    kernels: tuple[str, ...] = ()
    reports_dir: Path = Path("reports")
    jobs: int = 0  # 0: one per CPU core
    force: bool = False  # rerun cells even when the result cache has them
    accel: Literal["tcg", "kvm", "auto"] | None = None  # overrides matrix.yaml's accel


def now() -> str:
    """The current time as results record it (UTC, seconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _host_info() -> HostInfo:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


class MatrixRun:
    """One run of the matrix: its results document, where it goes, shared resources."""

    def __init__(
        self, opts: RunOptions, matrix: Matrix, kernels: list[Kernel], progress: Progress
    ) -> None:
        self.opts, self.matrix, self.kernels, self.progress = opts, matrix, kernels, progress
        self.out_dir = opts.reports_dir / opts.name
        self.cache = usable_cache(default_cache_dir())
        self.cell_cache = CellCache(self.cache / "cells")
        self.work_root = self.cache / "work" / opts.name
        self.carried: list[Cell] = []
        self.failed = threading.Event()  # set by the first cell kmatrix itself failed in
        self._lock = threading.Lock()
        self._accel: str | None = None
        # Per Debian architecture (amd64 always; arm64 when a kernel asks for it).
        self.archives: dict[str, Archive] = {}
        self.userlands: dict[str, Userland] = {}
        self.results: Results = {
            "schema_version": SCHEMA_VERSION,
            "run": {
                "name": opts.name,
                "started": now(),
                "finished": None,
                "kmatrix_version": __version__,
                "probe_sha256": probe_sha256(),
                "host": _host_info(),
                "matrix": str(opts.matrix_path.name),
                "expectations": list(matrix.expectations),
            },
            "cells": [],
        }

    def save(self, final: bool = False) -> None:
        """Write results.json and report.md as they stand (cells in matrix order).

        Cells this run has not finished yet keep their previous run's result (flagged
        ``carried_over``), so an interrupted run leaves no fewer results than before.
        Charts take seconds to draw, so they are drawn only once, at the end of the run.
        """
        with self._lock:
            order = {k.name: i for i, k in enumerate(self.kernels)}
            # In place: the results run_matrix returns are in matrix order too.
            self.results["cells"].sort(key=lambda c: order.get(c["id"], len(order)))
            done = {c["id"] for c in self.results["cells"]}
            old = [] if final else [c for c in self.carried if c["id"] not in done]
            doc: Results = self.results | {"cells": [*self.results["cells"], *old]}
            doc["cells"].sort(key=lambda c: order.get(c["id"], len(order)))
            with disk_errors(self.out_dir):
                write_results(self.out_dir / "results.json", doc)
                write_report(doc, self.out_dir, charts=final)

    def add(self, cell: Cell) -> None:
        """Record a finished cell and save at once."""
        with self._lock:
            self.results["cells"].append(cell)
        self.save()
        origin = " (cached)" if cell.get("cached") else ""
        self.progress.finish(
            cell["id"], f"{cell['status']}{origin} {cell.get('reason') or ''}".rstrip()
        )

    def accel(self, kernel: PreparedKernel) -> str:
        """The accelerator for every cell of this run (a KVM smoke boot decides ``auto``, once)."""
        with self._lock:
            if self._accel is None:
                self._accel = self.matrix.accel
                if self._accel == "auto":
                    work = self.cache / "work"
                    work.mkdir(parents=True, exist_ok=True)
                    self._accel = "kvm" if qemu.kvm_smoke_test(kernel.vmlinuz, work) else "tcg"
                    self.progress.log(f"KVM smoke boot chose {self._accel}")
            return self._accel
