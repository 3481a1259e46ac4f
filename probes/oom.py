"""OOM experiments: whom does the OOM killer kill when memory sits in memfd and tmpfs?

Each repeat of an experiment forks its roles (``holder``, ``bystander``, ``hog``; in the
memfd-growth experiments bystanders and a ``writer``) into one process group, emits an
``oom`` ``start`` record naming their pids (drained to the wire before the OOM, so even a
panic leaves it behind), lets the driver (the hog, or the writer) allocate until the
kernel acts, watches who dies in which order, cleans up and checks that Shmem is back at
its baseline before the next repeat. The harness itself runs with oom_score_adj -1000.
Sizes are fractions of MemAvailable at the start of the repeat (or of the cgroup limit),
so they mean the same at any guest size. The kernel's own account (Killed process lines)
is parsed on the host from the console; the record carries what only the guest can see.

This module: the experiments in run order (``EXPERIMENTS``), the probe-wide ``Env``, plans
(``--oom``) and the roles' sizes. A plan runs in oom_run.py, one repeat in oom_repeat.py
(oom-memcg-cross-charge in oom_cross.py), which uses oom_scope.py (where the OOM happens),
oom_harness.py (forking, killing and reaping the roles of oom_roles.py), oom_watch.py
(following the driver), oom_model.py (the badness model) and oom_judge.py (what the
outcome says); oom_growth.py has what only the memfd-growth experiments need.

In a container (``Env.memcg == "container"``) the memcg experiments run in the
container's own memory cgroup (sizes: :func:`container_sizes`), and a harness that cannot
lower its oom_score_adj raises every role's instead (oom_run.CONTAINER_ROLE_ADJ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import oom_growth
import oom_scope
from accounting import read_meminfo
from oom_roles import OOM_SCORE_ADJ_NEUTRAL

Record = dict[str, Any]
Emit = Callable[[Record], None]

# Sizes are fractions of MemAvailable at the start of each repeat (the guest's memory
# minus the userland in rootfs and the harness), chosen so the roles keep their order at
# any guest size: a mapped holder (half) > the hog (what is left, ~40 %) > the bystander.
HOLDER_FRACTION = 0.50  # the holder's file, of MemAvailable (global) or of the limit
BYSTANDER_FRACTION = 0.04  # of MemAvailable (global) or of the limit (memcg)
# memory.max, of MemAvailable: a fraction of MemTotal would let the global limit hit
# first in a small guest (the userland alone is ~36 MiB of rootfs Shmem).
MEMCG_LIMIT_FRACTION = 0.50
HOG_CAP_FACTOR = 2  # the hog stops (and says so) after 2x MemTotal: no OOM happened


@dataclass(frozen=True)
class Experiment:
    """One OOM experiment: how the holder keeps its memory, and where the OOM happens.

    ``holder`` "memfd-grow" has no holder and no hog: a ``writer`` grows an unmapped memfd
    until the kernel acts, among three bystanders holding anon memory; "cross" is
    oom-memcg-cross-charge (oom_cross.py).
    """

    name: str
    holder: str  # memfd-write | memfd-mapped | tmpfile-shm | shm-named | fd-passed | memfd-grow
    scope: str = "global"  # global | v2 | v1
    group: bool = False  # memory.oom.group=1
    killable: bool = True  # False: every role runs at oom_score_adj -1000
    writer_protected: bool = False  # memfd-grow: the writer runs at oom_score_adj -1000
    kill_allocating: bool = False  # vm.oom_kill_allocating_task=1 during the repeat
    swapped: bool = False  # swap on for the repeat; the holder pushes its memfd out to it

    @property
    def growth(self) -> bool:
        """The memfd itself is the pressure (a writer, no hog)."""
        return self.holder == "memfd-grow"


#: In run order. oom-memcg-v1 comes first (the v1 controller can only be taken before v2
#: used it, see oom_scope) and oom-no-killable last (it ends the boot with a panic).
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment("oom-memcg-v1", "memfd-write", "v1"),
        Experiment("oom-global-memfd-unmapped", "memfd-write"),
        Experiment("oom-global-memfd-mapped", "memfd-mapped"),
        Experiment("oom-global-tmpfile-shm", "tmpfile-shm"),
        Experiment("oom-global-shm-named", "shm-named"),
        Experiment("oom-global-fd-passed", "fd-passed"),
        Experiment("oom-global-memfd-swapped", "memfd-swapped", swapped=True),
        Experiment("oom-global-memfd-growth", "memfd-grow"),
        Experiment("oom-global-memfd-growth-kill-allocating", "memfd-grow", kill_allocating=True),
        Experiment("oom-memcg-v2", "memfd-write", "v2"),
        Experiment("oom-memcg-v2-group", "memfd-write", "v2", group=True),
        Experiment("oom-memcg-v2-memfd-growth", "memfd-grow", "v2"),
        Experiment(
            "oom-memcg-v2-memfd-growth-protected", "memfd-grow", "v2", writer_protected=True
        ),
        Experiment("oom-memcg-cross-charge", "cross", "v2"),
        # Both end in a panic ("no killable processes" once the bystanders are gone):
        # last, so that each costs one boot per repeat and nothing else.
        Experiment("oom-global-memfd-growth-protected", "memfd-grow", writer_protected=True),
        Experiment("oom-no-killable", "memfd-write", killable=False),
    )
}


@dataclass(frozen=True)
class Env:
    """Probe-wide facts and settings for the experiments."""

    mem_total: int
    page_size: int
    shm_dir: str
    cgroup_root: str
    timeout: float
    out_fd: int
    memcg: str = "new"  # new: a fresh child cgroup per repeat | container: our own cgroup
    role_adj: int = OOM_SCORE_ADJ_NEUTRAL  # killable roles' oom_score_adj
    harness_protected: bool = True  # the harness runs at oom_score_adj -1000
    swap_dev: str | None = None  # the guest's swap disk, on only during swap experiments


def parse_plan(spec: str, repeats: int) -> list[tuple[str, int]]:
    """``all`` or ``name[:first-last],...`` -> (experiment, repeat index) units in run order.

    Unknown names raise ValueError naming the valid ones.
    """
    if spec.strip() == "all":
        return [(name, r) for name in EXPERIMENTS for r in range(repeats)]
    wanted: dict[str, list[int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, span = item.partition(":")
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown OOM experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
        first, _, last = span.partition("-")
        lo = int(first) if first else 0
        hi = int(last) if last else (lo if first else repeats - 1)
        wanted.setdefault(name, []).extend(range(lo, hi + 1))
    return [(name, r) for name in EXPERIMENTS for r in sorted(set(wanted.get(name, [])))]


def role_sizes(exp: Experiment, env: Env) -> dict[str, int]:
    """Bytes per role (and the cgroup limit), from MemAvailable right now.

    In the container's own cgroup they are fractions of its limit instead: MemTotal and
    MemAvailable there are the host's.
    """
    limit = oom_scope.container_limit(env.cgroup_root) if in_container(exp, env) else None
    if limit is not None:
        return container_sizes(limit)
    available = read_meminfo().get("meminfo_MemAvailable", env.mem_total // 2)
    limit_fraction = oom_growth.LIMIT_FRACTION if exp.growth else MEMCG_LIMIT_FRACTION
    base = available if exp.scope == "global" else int(available * limit_fraction)
    sizes = {"mem_available": available}
    if exp.growth:
        writer_cap = HOG_CAP_FACTOR * (env.mem_total if exp.scope == "global" else base)
        sizes |= oom_growth.sizes(exp.scope, base, writer_cap)
    else:
        sizes |= {
            "holder": int(base * HOLDER_FRACTION),
            "bystander": int(base * BYSTANDER_FRACTION),
            "hog": HOG_CAP_FACTOR * env.mem_total,
        }
    if exp.scope != "global":
        sizes["limit"] = base
    return sizes


def container_sizes(limit: int) -> dict[str, int]:
    """Role sizes as fractions of the container's memory limit; the hog stops at 2x it
    (the limit, not the host's RAM, bounds what it may need)."""
    return {
        "limit": limit,
        "holder": int(limit * HOLDER_FRACTION),
        "bystander": int(limit * BYSTANDER_FRACTION),
        "hog": HOG_CAP_FACTOR * limit,
    }


def in_container(exp: Experiment, env: Env) -> bool:
    """The experiment runs in the container's own memory cgroup (a docker cell's memcg one)."""
    return env.memcg == "container" and exp.scope != "global"
