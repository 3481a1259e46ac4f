"""The accounting scenarios' registry: ``SCENARIOS``, in the canonical (run and report) order.

An entry names the scenario and gives its ``act`` step, an optional ``prepare`` step
(scenario_actions.py, run in the scenario's child), a size (``--size-mib`` unless given)
and an optional skip check (scenario_checks.py, run in the probe before the fork). The
names and their order are probes/catalog.py's; scenario_child.py runs one entry.
"""

from __future__ import annotations

from scenario_actions import (
    HUGE_PAGE,
    act_anon_private,
    act_anon_shared,
    act_beyond_half,
    act_beyond_half_strict,
    act_map,
    act_map_swapped,
    act_map_unmap,
    act_memfd_2proc,
    act_memfd_hugetlb,
    act_memfd_hugetlb_noexec_seal,
    act_memfd_noexec_seal,
    act_write,
    act_write_swapped,
    prep_memfd,
    prep_memfd_2proc,
    prep_named_shm,
    prep_tmpfile_disk,
    prep_tmpfile_shm,
)
from scenario_checks import (
    beyond_half_size,
    need_disk,
    need_room_beyond_half,
    need_shm_limit,
    need_swap,
    need_sysctl_writable,
    over_limit_size,
)
from scenario_types import Scenario

_LIST = [
    Scenario("anon-private", act_anon_private),
    Scenario("anon-shared", act_anon_shared),
    Scenario("memfd-write", act_write, prep_memfd),
    Scenario("memfd-mmap", act_map, prep_memfd),
    Scenario("memfd-munmap", act_map_unmap, prep_memfd),
    Scenario("memfd-2proc", act_memfd_2proc, prep_memfd_2proc),
    Scenario("tmpfile-shm-write", act_write, prep_tmpfile_shm),
    Scenario("tmpfile-shm-mmap", act_map, prep_tmpfile_shm),
    Scenario("tmpfile-disk-write", act_write, prep_tmpfile_disk, check=need_disk),
    Scenario("tmpfile-disk-mmap", act_map, prep_tmpfile_disk, check=need_disk),
    Scenario("shm-named-write", act_write, prep_named_shm),
    Scenario("memfd-over-shm-limit", act_write, prep_memfd, over_limit_size, need_shm_limit),
    Scenario(
        "tmpfile-over-shm-limit", act_write, prep_tmpfile_shm, over_limit_size, need_shm_limit
    ),
    Scenario("memfd-hugetlb", act_memfd_hugetlb, size=lambda s: HUGE_PAGE),
    Scenario("memfd-noexec-seal", act_memfd_noexec_seal, size=lambda s: 0),
    Scenario("memfd-hugetlb-noexec-seal", act_memfd_hugetlb_noexec_seal, size=lambda s: 0),
    Scenario(
        "memfd-beyond-half-ram", act_beyond_half, prep_memfd, beyond_half_size,
        need_room_beyond_half,
    ),
    Scenario(
        "memfd-beyond-half-ram-strict", act_beyond_half_strict, prep_memfd, beyond_half_size,
        need_sysctl_writable,
    ),
    # Last: they swap the guest's swap disk on (the probe swaps it off after each one).
    Scenario("memfd-write-swapped", act_write_swapped, prep_memfd, check=need_swap),
    Scenario("memfd-mmap-swapped", act_map_swapped, prep_memfd, check=need_swap),
]  # fmt: skip

#: Canonical scenario name -> Scenario, in the canonical order.
SCENARIOS: dict[str, Scenario] = {s.name: s for s in _LIST}
