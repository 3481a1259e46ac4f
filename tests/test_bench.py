"""`invoke bench`'s CPU figures: the parser of /proc/stat and the counters it reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kmatrix.run.bench import CpuUse, steal_seconds

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


def test_children_count_a_reaped_child_s_cpu() -> None:
    """A child that spins for 0.3 s of CPU shows in children_s once reaped (the QEMUs of a
    run are reaped through their guard, whose waited children count likewise)."""
    before = CpuUse.now()
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    after = CpuUse.now()
    assert after.children_s - before.children_s >= 0.3
    assert after.own_s >= before.own_s


def test_since_is_the_difference_and_no_steal_without_both_readings() -> None:
    """A run's use is the counters' difference; a steal missing at either end is unknown."""
    before, after = CpuUse(1.0, 10.0, 2.0), CpuUse(1.5, 30.0, 2.5)
    assert after.since(before) == CpuUse(0.5, 20.0, 0.5)
    assert CpuUse(1.5, 30.0, None).since(before).steal_s is None
    assert after.since(CpuUse(1.0, 10.0, None)).steal_s is None
