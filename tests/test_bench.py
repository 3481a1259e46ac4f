"""`invoke bench`'s CPU figures: the parser of /proc/stat and the counters it reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kmatrix.backends import lifeline
from kmatrix.run.bench import CpuUse, Timed, _warm_runs, every_boot_ended, steal_seconds

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "proc"


def test_steal_comes_from_the_all_cpus_line() -> None:
    """Recorded on the development machine (Linux 6.18, 2 vCPUs, USER_HZ 100): 256 ticks
    on the "cpu" line, which the kernel converts from the CPUs' summed nanoseconds (so not
    cpu0's 126 + cpu1's 129 exactly)."""
    assert steal_seconds((FIXTURES / "stat").read_text(), 100) == 2.56


def test_no_steal_column_or_no_cpu_line_is_none() -> None:
    """A kernel before 2.6.11 writes 7 columns; a text without the "cpu" line has none."""
    assert steal_seconds("cpu  1 2 3 4 5 6 7\ncpu0 1 2 3 4 5 6 7\n", 100) is None
    assert steal_seconds("cpu0 1 2 3 4 5 6 7 8\nintr 0\n", 100) is None


SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"


def test_children_count_the_cpu_of_a_command_run_through_the_guard() -> None:
    """A QEMU runs under the guard (backends/guard.py), which forks it and waits for it: a
    command spinning for 0.3 s of CPU there shows in children_s once the guard is reaped."""
    argv, fds = lifeline.guarded([sys.executable, "-c", SPIN], 30.0)
    before = CpuUse.now()
    subprocess.run(argv, check=True, pass_fds=fds)
    assert CpuUse.now().since(before).children_s >= 0.3


def test_own_counts_this_process_s_cpu() -> None:
    """Spinning here for 0.2 s of CPU shows in own_s, not in children_s."""
    before = CpuUse.now()
    exec(SPIN.replace("0.3", "0.2"))
    used = CpuUse.now().since(before)
    assert used.own_s >= 0.2
    assert used.children_s < 0.1


def _cell(status: str = "ok", timed_out: bool = False) -> dict[str, object]:
    return {"id": "6.12", "backend": "qemu", "status": status, "wall_s": 30.0,
            "oom_boots": [{"timed_out": False}, {"timed_out": timed_out}]}  # fmt: skip


def test_the_warm_rows_take_each_counter_and_leave_out_a_run_with_a_killed_boot(
    tmp_path: Path,
) -> None:
    """A run whose cells all ended by themselves gives the three CPU rows, each from its
    own counter; a run with a timed-out OOM boot (its QEMU killed, never reaped by its
    guard) gives none, but still its wall time."""
    runs = iter([
        Timed(100.0, CpuUse(5.0, 190.0, 0.8), {"cells": [_cell()]}),  # type: ignore[typeddict-item]
        Timed(120.0, CpuUse(6.0, 150.0, 1.0), {"cells": [_cell(timed_out=True)]}),  # type: ignore[typeddict-item]
    ])  # fmt: skip
    rows: dict[str, list[float | None]] = {}
    _warm_runs(lambda *_a, **_k: next(runs), lambda w, v: rows.setdefault(w, []).append(v),
               tmp_path, 2, lambda _m: None)  # fmt: skip
    assert rows["whole matrix, warm (every cell booted)"] == [100.0, 120.0]
    assert rows["CPU of a warm run: QEMU (and other children)"] == [190.0]
    assert rows["CPU of a warm run: kmatrix itself"] == [5.0]
    assert rows["CPU stolen by the machine's hypervisor in a warm run"] == [0.8]


def test_every_boot_ended_needs_every_cell_ok_and_no_timed_out_boot() -> None:
    """Either way: an ok cell whose boots all ended; a timed-out cell; a timed-out boot."""
    assert every_boot_ended({"cells": [_cell(), _cell()]})
    assert not every_boot_ended({"cells": [_cell(), _cell("timeout")]})
    assert not every_boot_ended({"cells": [_cell(timed_out=True)]})


def test_since_is_the_difference_and_no_steal_without_both_readings() -> None:
    """A run's use is the counters' difference; a steal missing at either end is unknown."""
    before, after = CpuUse(1.0, 10.0, 2.0), CpuUse(1.5, 30.0, 2.5)
    assert after.since(before) == CpuUse(0.5, 20.0, 0.5)
    assert CpuUse(1.5, 30.0, None).since(before).steal_s is None
    assert after.since(CpuUse(1.0, 10.0, None)).steal_s is None
