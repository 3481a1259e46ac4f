"""The scenarios' steps: what a scenario's fresh child does while the parent measures.

Each scenario has an optional ``prepare`` step (run before the BEFORE measurement, for
things that must exist then, such as the fd whose filesystem is statvfs'ed) and an
``act`` step (run between BEFORE and AFTER). Both run in the scenario's child process and
keep every mapping and fd alive in ``ctx.keep`` until the parent kills the child.
An ``OSError`` escaping a step is reported as the scenario's errno; details go to
``ctx.detail``. Feature probes (memfd-hugetlb, the noexec seals) record each step's
outcome; the strict beyond-half-RAM step and the huge page reservation set a sysctl and
put it back themselves.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Callable
from typing import TypeVar, cast

import accounting
import swap
from accounting import read_int
from messages import errno_name
from scenario_types import CHUNK_SIZE, MIB, Ctx
from system import write_text

HUGE_PAGE = 2 * MIB
MFD_NOEXEC_SEAL = 0x0008
F_SEAL_EXEC = 0x0020
HUGE_PAGES_RESERVED = 2
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
OVERCOMMIT = "/proc/sys/vm/overcommit_memory"

T = TypeVar("T")


# ---- building blocks -------------------------------------------------------------------


def touch(m: mmap.mmap, page_size: int) -> None:
    """Fault in every page of a writable mapping by writing one byte per page."""
    for offset in range(0, len(m), page_size):
        m[offset] = 1


def write_fill(ctx: Ctx, total: int) -> None:
    """write() ``total`` bytes to ``ctx.fd`` in 1 MiB chunks; record bytes_written."""
    view = memoryview(ctx.chunk)
    written = 0
    try:
        while written < total:
            written += os.write(ctx.fd, view[: min(CHUNK_SIZE, total - written)])
    finally:
        ctx.detail["bytes_written"] = written


def map_fd(ctx: Ctx, truncate: bool = True) -> mmap.mmap:
    """(ftruncate and) MAP_SHARED-map ``ctx.fd`` and touch every page; keeps the mapping."""
    if truncate:
        os.ftruncate(ctx.fd, ctx.size)
    m = mmap.mmap(ctx.fd, ctx.size, flags=mmap.MAP_SHARED)
    ctx.keep.append(m)
    touch(m, ctx.settings.page_size)
    return m


def step(ctx: Ctx, label: str, action: Callable[[], T]) -> T:
    """Run one step of a feature probe, recording ``ok`` or its errno in detail."""
    try:
        result = action()
    except OSError as exc:
        ctx.detail[label] = errno_name(exc)
        raise
    ctx.detail[label] = "ok"
    return result


# ---- prepare steps ---------------------------------------------------------------------


def prep_memfd(ctx: Ctx) -> None:
    """Create the memfd (empty) so the parent can statvfs it before the action."""
    ctx.fd = os.memfd_create(f"kmatrix-{ctx.name}")
    ctx.fs_fd = ctx.fd


def _prep_tmpfile(ctx: Ctx, directory: str) -> None:
    """Open an unnamed O_TMPFILE in ``directory``."""
    ctx.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    ctx.fs_path = directory


def prep_tmpfile_shm(ctx: Ctx) -> None:
    """O_TMPFILE on shm_dir."""
    _prep_tmpfile(ctx, ctx.settings.shm_dir)


def prep_tmpfile_disk(ctx: Ctx) -> None:
    """O_TMPFILE on disk_dir."""
    _prep_tmpfile(ctx, ctx.settings.disk_dir)


def prep_named_shm(ctx: Ctx) -> None:
    """Create the named file in shm_dir (the parent removes it afterwards)."""
    ctx.fd = os.open(ctx.named_path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    ctx.fs_path = ctx.settings.shm_dir
    ctx.detail["path"] = ctx.named_path


def prep_memfd_2proc(ctx: Ctx) -> None:
    """Create and size the memfd and fork the grandchild that will map it too."""
    prep_memfd(ctx)
    os.ftruncate(ctx.fd, ctx.size)
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _grandchild_main(ctx, go_r, done_w, close=[go_w, done_r])
    os.close(go_r)
    os.close(done_w)
    ctx.pipes.update(go_w=go_w, done_r=done_r)
    ctx.detail["grandchild_pid"] = pid


def _grandchild_main(ctx: Ctx, go_r: int, done_w: int, close: list[int]) -> None:
    """Grandchild of memfd-2proc: on "go" map and touch the memfd, then hold it."""
    status = 1
    try:
        for fd in close + ctx.protocol_fds:
            os.close(fd)
        if os.read(go_r, 1):
            map_fd(ctx, truncate=False)
            os.write(done_w, b"d")
            os.read(go_r, 1)  # returns (EOF) only when the child is gone
        status = 0
    finally:
        os._exit(status)


# ---- actions ---------------------------------------------------------------------------


def act_anon_private(ctx: Ctx) -> None:
    """MAP_PRIVATE|MAP_ANONYMOUS mapping, every page touched."""
    m = mmap.mmap(-1, ctx.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ctx.keep.append(m)
    touch(m, ctx.settings.page_size)


def act_anon_shared(ctx: Ctx) -> None:
    """Python's default anonymous mmap (MAP_SHARED|MAP_ANONYMOUS = shmem), touched."""
    m = mmap.mmap(-1, ctx.size)
    ctx.keep.append(m)
    touch(m, ctx.settings.page_size)


def act_write(ctx: Ctx) -> None:
    """Fill the prepared fd with write()."""
    write_fill(ctx, ctx.size)


def act_map(ctx: Ctx) -> None:
    """ftruncate the prepared fd, map it MAP_SHARED and touch every page."""
    map_fd(ctx)


def act_map_unmap(ctx: Ctx) -> None:
    """As act_map, then munmap; the fd stays open."""
    map_fd(ctx).close()


def act_memfd_2proc(ctx: Ctx) -> None:
    """Map and touch the memfd here, then let the grandchild do the same."""
    map_fd(ctx, truncate=False)
    os.write(ctx.pipes["go_w"], b"g")
    if not os.read(ctx.pipes["done_r"], 1):
        raise RuntimeError("grandchild exited before mapping the memfd")


# ---- feature probes --------------------------------------------------------------------


def _reserve_huge_pages(ctx: Ctx, wanted: int) -> int | None:
    """Make sure ``wanted`` huge pages are reserved (vm.nr_hugepages); the count before.

    Without a reservation an MFD_HUGETLB mapping fails with ENOMEM on every default
    kernel: that measures the sysctl, not the feature. The previous value is put back
    right after the page is faulted in; a page in use then becomes a surplus page, freed
    when the child dies (mm/hugetlb.c set_max_huge_pages)."""
    before = read_int(NR_HUGEPAGES)
    ctx.detail["nr_hugepages_before"] = before
    if before is not None and before < wanted:
        try:
            write_text(NR_HUGEPAGES, str(wanted))
            ctx.detail["reserve"] = "ok"
        except OSError as exc:  # a container's read-only /proc/sys
            ctx.detail["reserve"] = errno_name(exc)
    ctx.detail["nr_hugepages"] = read_int(NR_HUGEPAGES)
    return before


def act_memfd_hugetlb(ctx: Ctx) -> None:
    """Feature probe: huge pages reserved, then MFD_HUGETLB memfd, 2 MiB ftruncate, mmap, touch."""
    before = _reserve_huge_pages(ctx, HUGE_PAGES_RESERVED)
    try:
        flags = os.MFD_CLOEXEC | os.MFD_HUGETLB
        ctx.fd = step(ctx, "memfd_create", lambda: os.memfd_create("kmatrix-hugetlb", flags))
        step(ctx, "ftruncate", lambda: os.ftruncate(ctx.fd, HUGE_PAGE))
        m = step(ctx, "mmap", lambda: mmap.mmap(ctx.fd, HUGE_PAGE, flags=mmap.MAP_SHARED))
        ctx.keep.append(m)
        m[0] = 1
        ctx.detail["touch"] = "ok"
    finally:
        if ctx.detail.get("reserve") == "ok" and before is not None:
            write_text(NR_HUGEPAGES, str(before))


def act_memfd_noexec_seal(ctx: Ctx) -> None:
    """Feature probe: MFD_NOEXEC_SEAL; if supported, does fchmod(0o755) fail?"""
    _noexec_seal(ctx, os.MFD_CLOEXEC | MFD_NOEXEC_SEAL)


def act_memfd_hugetlb_noexec_seal(ctx: Ctx) -> None:
    """Feature probe: MFD_HUGETLB|MFD_NOEXEC_SEAL: seals, mode, is chmod +x refused?"""
    _noexec_seal(ctx, os.MFD_CLOEXEC | os.MFD_HUGETLB | MFD_NOEXEC_SEAL)


def _noexec_seal(ctx: Ctx, flags: int) -> None:
    ctx.detail["vm_memfd_noexec"] = read_int("/proc/sys/vm/memfd_noexec")
    ctx.fd = step(ctx, "memfd_create", lambda: os.memfd_create("kmatrix-noexec", flags))
    ctx.detail["mode"] = oct(os.fstat(ctx.fd).st_mode & 0o7777)
    seals = fcntl.fcntl(ctx.fd, fcntl.F_GET_SEALS)
    ctx.detail["seals"] = seals
    ctx.detail["seal_exec"] = bool(seals & F_SEAL_EXEC)
    try:
        os.fchmod(ctx.fd, 0o755)
        ctx.detail["fchmod_755"] = "ok"
    except OSError as exc:
        ctx.detail["fchmod_755"] = errno_name(exc)


# ---- beyond half of RAM, swap ----------------------------------------------------------


def act_beyond_half(ctx: Ctx) -> None:
    """write() ~65 % of MemTotal into an unmapped memfd; its mount's statfs as evidence."""
    st = os.fstatvfs(ctx.fd)
    # The kernel-internal shm_mnt is mounted without size= (mm/shmem.c shmem_fill_super
    # gives SB_KERNMOUNT no max_blocks): f_blocks 0 means "no limit", not "0 bytes".
    ctx.detail.update(f_blocks=st.f_blocks, f_bsize=st.f_bsize)
    total = accounting.mem_total() or 0
    ctx.detail["mem_total"] = total
    try:
        write_fill(ctx, ctx.size)
    finally:
        written = cast(int, ctx.detail["bytes_written"])  # write_fill's count, always set
        ctx.detail["written_of_mem_total"] = round(written / total, 3)


def act_beyond_half_strict(ctx: Ctx) -> None:
    """As act_beyond_half under vm.overcommit_memory=2 (restored before AFTER is read)."""
    before = read_int(OVERCOMMIT)
    write_text(OVERCOMMIT, "2")
    try:
        ctx.detail["commit_before"] = _commit()
        act_beyond_half(ctx)
    finally:
        ctx.detail["commit_after"] = _commit()
        write_text(OVERCOMMIT, str(before if before is not None else 0))
        ctx.detail["overcommit_memory_during"] = 2


def _commit() -> dict[str, int | None]:
    fields = accounting.meminfo_fields()
    return {k: fields.get(k) for k in ("CommitLimit", "Committed_AS")}


def act_write_swapped(ctx: Ctx) -> None:
    """Fill the memfd with write() (never mapped), then push its pages out to swap."""
    write_fill(ctx, ctx.size)
    ctx.detail["pushed_by"] = swap.push_out(ctx.fd, ctx.size)


def act_map_swapped(ctx: Ctx) -> None:
    """Map and touch the memfd, then push its pages out to swap; the mapping stays."""
    ctx.detail["pushed_by"] = swap.push_out(ctx.fd, ctx.size, map_fd(ctx))
