"""Running a plan of OOM experiments: protecting the harness, then repeat by repeat.

The plan is a list of (experiment, repeat index) units (oom.parse_plan); every repeat
emits its ``oom`` records and nothing raised by one stops the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import oom_cross
import oom_repeat
from oom import EXPERIMENTS, Emit, Env, Experiment, Record
from oom_roles import OOM_SCORE_ADJ_MIN
from system import write_text

#: oom_score_adj of every role when the harness cannot go to -1000 (no CAP_SYS_RESOURCE:
#: raising one's own adjustment needs no privilege, lowering it below the value the
#: process started with does). mm/oom_kill.c oom_badness() adds adj * totalpages / 1000
#: to every role alike, so their order is the same as at adj 0, while each role scores
#: at least totalpages / 2 above its RSS: the harness (adj 0, ~10 MiB RSS) is never
#: preferred over them. For a memcg OOM constrained_alloc() sets totalpages to
#: mem_cgroup_get_max() -- the cgroup's own limit (+ swap, none here), on v1 and v2
#: alike -- so the offset is half the container's limit, not half the host's RAM.
CONTAINER_ROLE_ADJ = 500


def protect_harness() -> str | None:
    """oom_score_adj -1000 for the harness (and, inherited, the roles until they reset it).

    Lowering the adjustment needs CAP_SYS_RESOURCE: a container may refuse. Returns why
    the harness is unprotected, or None.
    """
    try:
        write_text("/proc/self/oom_score_adj", str(OOM_SCORE_ADJ_MIN))
    except OSError as exc:
        return f"the harness cannot set its oom_score_adj to -1000 ({exc})"
    return None


def _runner(exp: Experiment) -> Callable[[Experiment, int, Env, Emit], Record]:
    """oom_repeat's run_repeat, or oom_cross's for the cross-charge experiment."""
    return oom_cross.run_repeat if exp.holder == "cross" else oom_repeat.run_repeat


def run_plan(plan: list[tuple[str, int]], env: Env, emit: Emit) -> int:
    """Run the (experiment, repeat) units in order, emitting a record per repeat.

    A global OOM could kill an unprotected harness: those experiments are then "not
    available". memcg OOMs only kill inside the cgroup, which the harness is not in --
    except in a container, where it is and the roles' adjustment is raised instead.
    Nothing raised by one repeat stops the others.
    """
    unprotected = protect_harness()
    if unprotected and env.memcg == "container":
        # The harness shares the roles' (the container's) cgroup: raise theirs instead.
        env = dataclasses.replace(env, role_adj=CONTAINER_ROLE_ADJ, harness_protected=False)
    for name, repeat in plan:
        exp = EXPERIMENTS[name]
        if unprotected and exp.scope == "global":
            rec = oom_repeat.new_record(exp, repeat, env)
            rec.update(status="not available", error=unprotected)
        else:
            try:
                rec = _runner(exp)(exp, repeat, env, emit)
            except Exception as exc:
                rec = {"type": "oom", "event": "result", "name": name, "repeat": repeat}
                rec.update(status="error", error=f"probe error: {exc!r}")
        emit(rec)
    return len(plan)
