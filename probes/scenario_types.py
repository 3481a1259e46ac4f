"""What a scenario is made of, shared by the registry, its steps and the child protocol.

``Settings`` are the probe-wide facts fixed before the first fork; ``Ctx`` is the state a
scenario's steps work on in its child; ``Scenario`` is a registry entry (scenarios.py)
and ``Skip`` what a check returns when the scenario cannot run; the parent chooses the
path of a scenario's named /dev/shm file (:func:`named_shm_path`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

MIB = 1 << 20
CHUNK_SIZE = MIB


@dataclass(frozen=True)
class Settings:
    """Probe-wide settings, fixed before the first fork."""

    size: int
    page_size: int
    shm_dir: str
    disk_dir: str
    shm_size: int | None
    disk_problem: str | None
    swap_dev: str | None = None  # the guest's swap disk, swapped on only by swap scenarios
    #: The probe adopts orphans (PR_SET_CHILD_SUBREAPER): a scenario's whole process group
    #: is then its children once the scenario child is gone, and waitpid finds them all.
    subreaper: bool = False


@dataclass
class Ctx:
    """Child-side state of one scenario."""

    name: str
    size: int
    settings: Settings
    named_path: str
    protocol_fds: list[int]
    chunk: bytes = b""
    fd: int = -1
    fs_path: str | None = None
    fs_fd: int | None = None
    pipes: dict[str, int] = field(default_factory=dict)
    keep: list[object] = field(default_factory=list)
    detail: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """Why a scenario is not run: the record's error text plus detail entries."""

    error: str
    detail: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """A registry entry: how to size, check, prepare and perform one scenario."""

    name: str
    act: Callable[[Ctx], None]
    prepare: Callable[[Ctx], None] | None = None
    size: Callable[[Settings], int] = lambda s: s.size
    check: Callable[[Settings], Skip | None] | None = None


def named_shm_path(settings: Settings, name: str) -> str:
    """Path of the named /dev/shm file of a scenario (chosen by the parent)."""
    return os.path.join(settings.shm_dir, f"kmatrix-{name}-{os.getpid()}")
