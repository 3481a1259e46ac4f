"""`invoke bench`: measure the matrix's speed and memory and print a table of figures.

Benchmarks print numbers for the README; they assert nothing (timed tests flake).
"""

from __future__ import annotations

import io
import os
import re
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from kmatrix.config import load_matrix
from kmatrix.debian.archive import Archive, default_cache_dir, resolve_mirror
from kmatrix.guest.userland import build_userland
from kmatrix.results.contract import Results
from kmatrix.results.schema import AnyResults
from kmatrix.run.matrix import RunOptions, run_matrix
from kmatrix.run.progress import Progress

# The kernel logs this line just before it executes our /init (init/main.c run_init_process).
_RUN_INIT_RE = re.compile(r"\[\s*(\d+\.\d+)\] Run /init as init process")
# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal ..., in USER_HZ
# ticks (fs/proc/stat.c show_stat); steal is the 8th, absent before Linux 2.6.11.
_STEAL_FIELD = 8


@dataclass(frozen=True)
class Figure:
    """One measured quantity: its samples and unit."""

    what: str
    samples: list[float]
    unit: str = "s"

    def row(self) -> list[str]:
        """what, median, min, max, n."""
        s = self.samples
        if not s:
            return [self.what, "—", "—", "—", "0"]

        def fmt(v: float) -> str:
            return f"{v:.1f}" if self.unit == "s" else f"{v:.0f}"

        return [
            self.what,
            f"{fmt(statistics.median(s))} {self.unit}",
            fmt(min(s)),
            fmt(max(s)),
            str(len(s)),
        ]


def boot_to_init_seconds(console: str) -> float | None:
    """Guest seconds from power-on to our /init, from the kernel's own timestamp."""
    m = _RUN_INIT_RE.search(console)
    return float(m.group(1)) if m else None


def steal_seconds(proc_stat: str, ticks_per_s: int) -> float | None:
    """CPU time the machine's hypervisor gave to others, summed over every CPU, from the
    text of /proc/stat (None where the line has no steal column)."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return int(fields[_STEAL_FIELD]) / ticks_per_s if len(fields) > _STEAL_FIELD else None
    return None


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds at one moment: this process and its reaped children (the QEMUs), and
    the machine's steal (None off Linux)."""

    own_s: float
    children_s: float
    steal_s: float | None

    @staticmethod
    def now() -> CpuUse:
        """Read the counters."""
        me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        try:
            stat: str | None = Path("/proc/stat").read_text()
        except OSError:
            stat = None
        steal = steal_seconds(stat, os.sysconf("SC_CLK_TCK")) if stat else None
        return CpuUse(me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime, steal)

    def since(self, before: CpuUse) -> CpuUse:
        """What was used from ``before`` to this moment."""
        steal = None
        if self.steal_s is not None and before.steal_s is not None:
            steal = self.steal_s - before.steal_s
        return CpuUse(self.own_s - before.own_s, self.children_s - before.children_s, steal)


@dataclass(frozen=True)
class Timed:
    """One run of the matrix in the bench: its wall time, CPU use and results."""

    seconds: float
    cpu: CpuUse
    results: Results


def render_figures(figures: list[Figure], note: str) -> str:
    """The bench table as markdown."""
    rows = [f.row() for f in figures]
    table = tabulate(rows, ["what", "median", "min", "max", "n"], tablefmt="github")
    return f"{table}\n\n{note}\n"


@contextmanager
def _cache_at(path: Path) -> Iterator[None]:
    old = os.environ.get("KMATRIX_CACHE")
    os.environ["KMATRIX_CACHE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KMATRIX_CACHE", None)
        else:
            os.environ["KMATRIX_CACHE"] = old


def run_bench(
    matrix_path: Path, repeats: int = 3, cold: bool = True, log: Callable[[str], None] = print
) -> str:
    """Run the matrix cold (empty cache), warm (forced) and unchanged; return the figures."""
    work = Path(tempfile.mkdtemp(prefix="kmatrix-bench-"))
    quiet = Progress(io.StringIO(), live=False)

    figures: dict[str, Figure] = {}

    def add(what: str, value: float | None, unit: str = "s") -> None:
        if value is not None:
            figures.setdefault(what, Figure(what, [], unit)).samples.append(value)

    def run(name: str, force: bool, kernels: tuple[str, ...] = ()) -> Timed:
        opts = RunOptions(
            matrix_path=matrix_path, name=name, reports_dir=work, force=force, kernels=kernels
        )
        start, before = time.monotonic(), CpuUse.now()
        results = run_matrix(opts, quiet)
        return Timed(time.monotonic() - start, CpuUse.now().since(before), results)

    try:
        if cold:
            log("cold run: empty cache (downloads every kernel and the userland)")
            with _cache_at(work / "cold-cache"):
                add("whole matrix, cold (download + build + boot)", run("cold", True).seconds)
            shutil.rmtree(work / "cold-cache", ignore_errors=True)
        results = _warm_runs(run, add, work, repeats, log)
        alone = next((c["id"] for c in results["cells"] if c["backend"] == "qemu"), None)
        for i in range(repeats if alone else 0):
            log(f"one cell alone {i + 1}/{repeats}: {alone}")
            seconds = run(f"alone{i}", force=True, kernels=(str(alone),)).seconds
            add(f"one cell alone ({alone}: accounting + OOM boots)", seconds)
        for i in range(repeats):
            add("unchanged rerun (all cells from cache)", run(f"cached{i}", False).seconds)
        add("userland build (from cached .debs)", _time_userland_build(matrix_path))
        # RUSAGE_CHILDREN is no measure of QEMU: a forked child starts with the parent's
        # RSS, so its maximum is this process's own. A QEMU cell's RAM is guest.memory.
        add(
            "peak RSS of kmatrix"
            + (" (the cold run parses whole Packages indices)" if cold else ""),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "MiB",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cores = os.cpu_count()
    note = (
        f"Machine: {cores} cores, {_mem_total_gib():.0f} GiB RAM; cells in parallel: {cores}. "
        "CPU figures leave out the Docker cell's container (dockerd runs it)."
    )
    return render_figures(list(figures.values()), note)


def _warm_runs(
    run: Callable[..., Timed],
    add: Callable[[str, float | None], None],
    work: Path,
    repeats: int,
    log: Callable[[str], None],
) -> AnyResults:
    """The forced warm runs: the whole matrix, each cell's wall time and boot to init."""
    results: AnyResults = {"cells": []}
    for i in range(repeats):
        log(f"warm run {i + 1}/{repeats}: downloads cached, every cell booted")
        timed = run(f"warm{i}", force=True)
        results = timed.results
        add("whole matrix, warm (every cell booted)", timed.seconds)
        # How fast the machine was: on a VM the same run's work took 190 s of CPU one day
        # and 440 s another. A QEMU that kmatrix killed (a timeout) is never reaped by its
        # guard, so its CPU is not counted: such a run has no CPU figures.
        if every_boot_ended(results):
            add("CPU of a warm run: QEMU (and other children)", timed.cpu.children_s)
            add("CPU of a warm run: kmatrix itself", timed.cpu.own_s)
            add("CPU stolen by the machine's hypervisor in a warm run", timed.cpu.steal_s)
        else:
            log(f"warm run {i + 1}: a cell or boot did not end by itself; no CPU figures")
        for cell in results["cells"]:
            # wall_s: a cell's boots run side by side; duration_s sums them.
            wall = cell.get("wall_s") or cell.get("duration_s")
            add(f"cell {cell['id']} ({cell['backend']}), in the matrix", wall)
            console = work / f"warm{i}" / "console" / f"{cell['id']}.log"
            if console.exists():
                text = console.read_text(errors="replace")
                add(f"boot to init {cell['id']}", boot_to_init_seconds(text))
    return results


def every_boot_ended(results: AnyResults) -> bool:
    """Whether every cell is ok and none of its OOM boots timed out: the QEMUs of such a
    run all exited by themselves, so their CPU reached this process (CpuUse)."""
    return all(
        cell.get("status") == "ok"
        and not any(b.get("timed_out") for b in cell.get("oom_boots") or [])
        for cell in results.get("cells") or []
    )


def _time_userland_build(matrix_path: Path) -> float:
    """Time building the guest userland archive from already-downloaded packages."""
    matrix = load_matrix(matrix_path)
    cache = default_cache_dir()
    with tempfile.TemporaryDirectory(prefix="kmatrix-userland-") as tmp:
        # Point the userland output at a fresh dir but reuse the downloaded .debs.
        scratch = Path(tmp)
        (scratch / "debs").symlink_to(cache / "debs")
        (scratch / "indices").symlink_to(cache / "indices")
        archive = Archive(
            resolve_mirror(matrix.mirror),
            scratch,
            keyring=matrix.keyring,
            check_valid_until=matrix.check_valid_until,
        )
        start = time.monotonic()
        build_userland(archive, matrix.guest.suite, scratch, lambda _m: None)
        return time.monotonic() - start


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0
