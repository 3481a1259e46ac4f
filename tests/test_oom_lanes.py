"""How a cell's OOM units are split into boots that run side by side (cells.oom_boots), and
in which order cells start (run.pool)."""

from __future__ import annotations

from typing import Any

from kmatrix import catalog
from kmatrix.cells.oom_boots import plan_lanes
from kmatrix.results.oom import EXPERIMENTS, Unit


def _units(names: tuple[str, ...], repeats: int = 3) -> list[Unit]:
    return [Unit(n, r) for n in names for r in range(repeats)]


def test_every_unit_runs_once_and_each_further_panic_gets_its_own_boot() -> None:
    units = _units(EXPERIMENTS)
    lanes = plan_lanes(units)
    flat = [u for lane in lanes for u in lane]
    assert len(flat) == len(units) and set(flat) == set(units)  # none lost, none twice
    ending = [u for u in units if u.name in catalog.ENDS_BOOT]
    first, *rest = lanes
    # The first lane: everything that does not end a boot, then one repeat that does.
    assert [u for u in first if u.name not in catalog.ENDS_BOOT] == [
        u for u in units if u.name not in catalog.ENDS_BOOT
    ]
    assert first[-1] == ending[0]
    assert rest == [[u] for u in ending[1:]]


def test_without_panicking_experiments_there_is_one_lane() -> None:
    calm = tuple(n for n in EXPERIMENTS if n not in catalog.ENDS_BOOT)
    assert plan_lanes(_units(calm)) == [_units(calm)]


def test_only_panicking_repeats() -> None:
    units = _units(("oom-no-killable",))
    assert plan_lanes(units) == [[u] for u in units]
    assert plan_lanes([]) == []


def test_foreign_architecture_cells_start_first_in_matrix_order_otherwise() -> None:
    from kmatrix.config import parse_matrix
    from kmatrix.run.pool import start_order

    matrix = parse_matrix(
        """
check_valid_until: false
kernels:
  - {name: a, suite: bookworm, package: linux-image-cloud-amd64}
  - {name: b, suite: trixie, package: linux-image-cloud-arm64, arch: arm64}
  - {name: c, suite: trixie, package: linux-image-cloud-amd64}
  - {name: host, backend: docker, memory: 512M}
"""
    )
    assert [k.name for k in start_order(list(matrix.kernels))] == ["b", "a", "c", "host"]


def test_a_repeat_no_boot_started_is_told_by_its_own_lane() -> None:
    """With lanes, the last boot may be another lane's: a repeat whose own boot died before
    the probe started is recorded against that boot, not the last one."""
    from kmatrix.results.oom import BootOutput, assemble
    from kmatrix.results.schema import parse_probe_output

    first, second = Unit("oom-no-killable", 0), Unit("oom-no-killable", 1)
    nothing = parse_probe_output([])
    boots = [
        BootOutput(1, [first], nothing, "", {"timed_out": True, "panic": None}),
        BootOutput(2, [second], nothing, "", {"timed_out": False, "panic": "System is deadlocked"}),
    ]
    (entry,) = assemble([first, second], boots)
    runs = entry["runs"]
    assert [r.get("boot") for r in runs] == [1, 2]
    assert "deadlocked" not in str(runs[0].get("error"))


def test_a_cancelled_lane_starts_no_boot() -> None:
    """Once the cell has failed elsewhere (its accounting boot raised), no lane boots again."""
    from kmatrix.cells.oom_boots import _run_lane

    booted: list[list[Unit]] = []

    def boot(rest: list[Unit]) -> Any:
        booted.append(rest)
        raise AssertionError("must not boot")

    assert _run_lane([Unit("oom-no-killable", 0)], boot, lambda: True) == []
    assert booted == []


def test_calm_repeats_split_into_consecutive_lanes_when_restored() -> None:
    units = _units(EXPERIMENTS)
    calm = [u for u in units if u.name not in catalog.ENDS_BOOT]
    ending = [u for u in units if u.name in catalog.ENDS_BOOT]
    first, second, *rest = plan_lanes(units, split=2)
    assert first[:-1] + second[:-1] == calm  # the canonical order, cut once
    assert [first[-1], second[-1]] == ending[:2]  # each closed by a boot-ending repeat
    assert abs(len(first) - len(second)) <= 1
    assert rest == [[u] for u in ending[2:]]
    assert plan_lanes(_units(("oom-no-killable",)), split=2) == plan_lanes(
        _units(("oom-no-killable",))
    )


def test_restored_every_boot_ending_repeat_closes_a_lane_of_calm_ones() -> None:
    """Each repeat that ends its boot costs a restore anyway: the calm repeats are spread
    over those restores, so there is no restore for calm repeats alone."""
    from kmatrix.cells.oom_boots import RESTORED_CALM_LANES, restored_split

    units = _units(EXPERIMENTS)
    ending = [u for u in units if u.name in catalog.ENDS_BOOT]
    lanes = plan_lanes(units, restored_split(units))
    assert len(lanes) == len(ending) > RESTORED_CALM_LANES
    assert [lane[-1] for lane in lanes] == ending
    assert [u for lane in lanes for u in lane[:-1]] == [u for u in units if u not in ending]
    assert max(map(len, lanes)) - min(map(len, lanes)) <= 1
    calm = _units(tuple(n for n in EXPERIMENTS if n not in catalog.ENDS_BOOT))
    assert restored_split(calm) == RESTORED_CALM_LANES


def test_calm_lanes_are_cut_evenly_whatever_the_counts() -> None:
    """10 calm repeats over 6 lanes: lengths 2 and 1 (not 2, 2, 2, 2, 2, 0); never more
    lanes than calm repeats."""
    calm = [Unit("oom-global-memfd-unmapped", r) for r in range(10)]
    ending = _units(("oom-no-killable", "oom-global-memfd-growth-protected"))
    lanes = plan_lanes(calm + ending, split=6)
    assert sorted(len(lane) - 1 for lane in lanes) == [1, 1, 2, 2, 2, 2]
    assert [u for lane in lanes for u in lane[:-1]] == calm
    assert len(plan_lanes(calm[:2] + ending, split=6)) == len(ending)
