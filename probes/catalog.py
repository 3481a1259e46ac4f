"""The names kmatrix shares between the probe, matrix.yaml and the expectations, in order.

Stdlib-free data only: the host loads this file (kmatrix.catalog) to validate configuration
and expectations without importing the probe; tests check that the probe's registries
(scenarios.SCENARIOS, oom.EXPERIMENTS, the roles it forks) use exactly these names.
"""

#: Accounting scenarios, in the probe's canonical (run and report) order.
SCENARIOS = (
    "anon-private",
    "anon-shared",
    "memfd-write",
    "memfd-mmap",
    "memfd-munmap",
    "memfd-2proc",
    "tmpfile-shm-write",
    "tmpfile-shm-mmap",
    "tmpfile-disk-write",
    "tmpfile-disk-mmap",
    "shm-named-write",
    "memfd-over-shm-limit",
    "tmpfile-over-shm-limit",
    "memfd-hugetlb",
    "memfd-noexec-seal",
    "memfd-hugetlb-noexec-seal",
    "memfd-beyond-half-ram",
    "memfd-beyond-half-ram-strict",
    "memfd-write-swapped",
    "memfd-mmap-swapped",
)

#: Scenarios run in the first pass only (``--repeats`` passes repeat the others): each one
#: writes most of RAM, fills a size limit or goes through swap, 0.5-3 s per pass under TCG,
#: while what it answers (an errno, a limit, where the pages went) needs no spread.
FIRST_PASS_ONLY = (
    "memfd-over-shm-limit",
    "tmpfile-over-shm-limit",
    "memfd-beyond-half-ram",
    "memfd-beyond-half-ram-strict",
    "memfd-write-swapped",
    "memfd-mmap-swapped",
)

#: OOM experiments in report order (the probe runs them in its own order: oom.EXPERIMENTS).
EXPERIMENTS = (
    "oom-global-memfd-unmapped",
    "oom-global-memfd-mapped",
    "oom-global-tmpfile-shm",
    "oom-global-shm-named",
    "oom-global-fd-passed",
    "oom-global-memfd-swapped",
    "oom-global-memfd-growth",
    "oom-global-memfd-growth-protected",
    "oom-global-memfd-growth-kill-allocating",
    "oom-memcg-v2",
    "oom-memcg-v2-group",
    "oom-memcg-v2-memfd-growth",
    "oom-memcg-v2-memfd-growth-protected",
    "oom-memcg-cross-charge",
    "oom-memcg-v1",
    "oom-no-killable",
)

#: Experiments whose expected outcome is a kernel panic.
EXPECTED_PANIC = ("oom-no-killable",)

#: Experiments that end their boot: a global OOM left with no killable process panics
#: ("System is deadlocked on memory", mm/oom_kill.c out_of_memory). The probe runs them
#: last and the host gives each further repeat a boot of its own, started alongside the
#: others. Only a schedule: whether a repeat panicked is read from its console.
ENDS_BOOT = ("oom-global-memfd-growth-protected", "oom-no-killable")

#: Experiments that swap the guest's swap disk on: only boots running them get the disk.
NEEDS_SWAP = ("oom-global-memfd-swapped",)

#: The processes of the OOM experiments (oom_roles.py), and "none" for a repeat that
#: killed nobody.
ROLES = (
    "hog",
    "holder",
    "bystander",
    "writer",
    "bystander-1",
    "bystander-2",
    "bystander-3",
    "creator",
    "receiver",
    "none",
)
