"""How a cell's OOM units are split into boots that run side by side (cells.oom_boots)."""

from __future__ import annotations

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
