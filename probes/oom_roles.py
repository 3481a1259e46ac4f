"""The processes of an OOM experiment: holder, bystander, hog (and fd-passed's creator,
cross-charge's receiver, the memfd-growth experiments' writer and bystander-N).

Every role is a forked child of the harness (oom_harness.py). It joins the repeat's
process group, names itself ``kmx-<role>`` (so the kernel's own OOM report says who is
who), sets its oom_score_adj, joins the experiment's cgroup, does its set-up, reports
``ready`` over a pipe and then holds its memory until the harness closes the command pipe
(or the OOM killer ends it). Only the driver -- the hog, or the writer -- acts on ``go``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
from dataclasses import dataclass, field
from typing import NoReturn

import swap
from messages import errno_name, send
from system import write_text

MIB = 1 << 20
#: write() buffer for filling files: big enough that a 100 MiB fill is ~50 system calls.
WRITE_CHUNK = 2 * MIB
#: The hog maps and populates this much per mmap() call: one system call per chunk, no
#: per-page Python loop, and the harness gets a progress line (and a /proc snapshot) per
#: chunk, so the snapshot "just before the OOM" is at most one chunk old.
HOG_CHUNK = 4 * MIB
#: The writer's memfd grows by this much per step (one progress line and snapshot each).
GROW_STEP = 4 * MIB

#: Killable roles get the neutral adjustment; the harness runs at -1000 and children
#: inherit it (lowering it back needs CAP_SYS_RESOURCE, which the guest's root has).
OOM_SCORE_ADJ_NEUTRAL = 0
OOM_SCORE_ADJ_MIN = -1000


@dataclass
class RoleSpec:
    """What one role process does; built by the harness before forking."""

    role: str
    # memfd-write | memfd-mapped | tmpfile-shm | shm-named | fd-receive | fd-create | anon | hog
    # | memfd-grow (the writer: grows an unmapped memfd on "go") | fd-receive-grow
    action: str
    size: int  # bytes to hold (hog: the most it will try to allocate)
    oom_score_adj: int = OOM_SCORE_ADJ_NEUTRAL
    cgroup_procs: str | None = None  # cgroup.procs file to join
    path: str | None = None  # shm dir (tmpfile-shm) or file path (shm-named)
    sock: socket.socket | None = None  # fd-passed: the socketpair end of this role
    extra: int = 0  # fd-receive-grow: bytes to append to the received memfd before mapping it
    close_fds: list[int] = field(default_factory=list)
    pgid: int = 0  # process group of the repeat (0: this role starts it)


_BUFFER = memoryview(b"\xa5" * WRITE_CHUNK)  # made once: every fill() writes from it


def fill(fd: int, total: int) -> int:
    """write() ``total`` bytes to ``fd`` from one preallocated buffer; returns bytes written."""
    view = _BUFFER
    written = 0
    while written < total:
        written += os.write(fd, view[: min(len(view), total - written)])
    return written


def _hold_file(spec: RoleSpec, keep: list[object]) -> dict[str, object]:
    """Create the holder's file, fill it with write(), and (memfd-mapped) map it."""
    if spec.action in ("memfd-write", "memfd-mapped", "fd-create", "memfd-swapped"):
        fd = os.memfd_create(f"kmx-{spec.role}")
    elif spec.action == "tmpfile-shm":
        assert spec.path
        fd = os.open(spec.path, os.O_TMPFILE | os.O_RDWR, 0o600)
    else:  # shm-named
        assert spec.path
        fd = os.open(spec.path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    written = fill(fd, spec.size)
    if spec.action == "memfd-mapped":
        # The pages exist after write(); MAP_POPULATE maps them all in one call, so they
        # count in RssShmem (MM_SHMEMPAGES) and therefore in oom_badness().
        m = mmap.mmap(fd, spec.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        keep.append(m)
    if spec.action == "memfd-swapped":
        # Pages out to the guest's swap disk, which the harness swapped on.
        return {"bytes_written": written, "fd": fd, "pushed_by": swap.push_out(fd, spec.size)}
    if spec.action == "fd-create":
        assert spec.sock is not None
        socket.send_fds(spec.sock, [b"m"], [fd])
        os.close(fd)
        return {"bytes_written": written, "passed": True}
    return {"bytes_written": written, "fd": fd}


def _receive_fd(spec: RoleSpec, keep: list[object]) -> dict[str, object]:
    """fd-passed holder: receive the memfd over SCM_RIGHTS and keep it (never mapped).

    fd-receive-grow (oom-memcg-cross-charge) then appends ``spec.extra`` bytes -- charged
    to this role's cgroup, the pages it allocates -- and maps and touches the whole file.
    """
    assert spec.sock is not None
    _, fds, _, _ = socket.recv_fds(spec.sock, 16, 1)
    if not fds:
        raise RuntimeError("no fd arrived over SCM_RIGHTS")
    fd = fds[0]
    info: dict[str, object] = {"fd": fd, "received_size": os.fstat(fd).st_size}
    if spec.action == "fd-receive-grow":
        os.lseek(fd, 0, os.SEEK_END)
        info["bytes_appended"] = fill(fd, spec.extra)
        size = os.fstat(fd).st_size
        keep.append(mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE))
        info["mapped_size"] = size
    return info


def _anon(size: int, keep: list[object]) -> None:
    """A private anonymous mapping with every page faulted in by the kernel (MAP_POPULATE)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    keep.append(mmap.mmap(-1, size, flags=flags))


def _hog(spec: RoleSpec, res_w: int, keep: list[object]) -> None:
    """Allocate private anonymous memory chunk by chunk until killed (or spec.size reached)."""
    total = 0
    while total < spec.size:
        _anon(HOG_CHUNK, keep)
        total += HOG_CHUNK
        send(res_w, {"progress": total})
    send(res_w, {"done": total})


def _grow(res_w: int, size: int) -> None:
    """The writer: fill an unmapped memfd with write() in GROW_STEP steps, reporting each.

    Nobody else holds the memfd (not the harness either): when the writer dies, the
    file's pages are freed. A failing write() (ENOMEM / ENOSPC when a memory cgroup has
    nothing left to kill) is reported as the end of the repeat, with the errno.
    """
    fd = os.memfd_create("kmx-writer")
    total = 0
    while total < size:
        try:
            total += fill(fd, min(GROW_STEP, size - total))
        except OSError as exc:
            send(res_w, {"write_error": errno_name(exc), "progress": os.fstat(fd).st_size})
            return
        send(res_w, {"progress": total})
    send(res_w, {"done": total})


def _setup(spec: RoleSpec) -> None:
    """Join the repeat's process group, name the process, set oom_score_adj, join the cgroup."""
    os.setpgid(0, spec.pgid)
    write_text("/proc/self/comm", f"kmx-{spec.role}")
    write_text("/proc/self/oom_score_adj", str(spec.oom_score_adj))
    if spec.cgroup_procs:
        write_text(spec.cgroup_procs, str(os.getpid()))


def role_main(spec: RoleSpec, cmd_r: int, res_w: int) -> NoReturn:
    """Body of a role process; never returns."""
    keep: list[object] = []
    status = 1
    try:
        for fd in spec.close_fds:
            os.close(fd)
        _setup(spec)
        info: dict[str, object] = {"ready": True, "pid": os.getpid()}
        if spec.action == "anon":
            _anon(spec.size, keep)
        elif spec.action in ("fd-receive", "fd-receive-grow"):
            info.update(_receive_fd(spec, keep))
        elif spec.action not in ("hog", "memfd-grow"):
            info.update(_hold_file(spec, keep))
        send(res_w, info)
        if spec.action == "fd-create":
            os._exit(0)  # the creator leaves: only the receiver keeps the memfd
        if spec.action == "hog" and os.read(cmd_r, 1) == b"g":
            _hog(spec, res_w, keep)
        elif spec.action == "memfd-grow" and os.read(cmd_r, 1) == b"g":
            _grow(res_w, spec.size)
        os.read(cmd_r, 1)  # hold everything until the harness closes the pipe
        status = 0
    except BaseException as exc:
        with contextlib.suppress(OSError):
            send(res_w, {"ready": False, "error": f"{spec.role}: {exc!r}"})
    finally:
        os._exit(status)
