"""The QEMU backend: build a QEMU command line (pure) and run it (always with a timeout).

Facts about QEMU on our machines (docs/architecture.md, "QEMU facts"): TCG needs ``-cpu max``
(Debian's 7.3 kernel prints nothing and never boots on QEMU's default CPU model); ``/dev/kvm``
may exist while nested KVM hangs forever, so KVM is used only after a smoke boot proves it
works.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kmatrix.backends import lifeline
from kmatrix.backends.qmp import load_command
from kmatrix.backends.slots import Slots
from kmatrix.errors import InfraError
from kmatrix.results.contract import TcgThread

QEMU_BINARY = "qemu-system-x86_64"

# panic=-1 reboots at once on a panic and -no-reboot turns that into QEMU exiting, so a
# panicked guest costs seconds, not the cell timeout. mitigations=off only speeds up TCG.
# cryptomgr.notests skips the crypto API's self-tests of every algorithm registered at boot
# (RSA, ECDSA, ... in software under TCG): measured (6.12, a boot whose probe exits at once,
# 3 boots each) 8.9 s -> 7.1 s of QEMU CPU. They test crypto code, nothing memory accounts.
BASE_APPEND = "panic=-1 mitigations=off cryptomgr.notests"
#: The virtio-blk serials of the ext4 and the swap disk, which the guest's init looks for.
DISK_SERIAL = "kmxdisk"
SWAP_SERIAL = "kmxswap"
#: The OOM plan disk of a boot that is saved and restored (probes/resume.py reads it).
PLAN_SERIAL = "kmxplan"

# Seconds past a boot's timeout after which the guard kills QEMU on its own: kmatrix kills
# it at the timeout; the guard is for a kmatrix that can no longer do so.
GUARD_GRACE_S = 10.0


@dataclass(frozen=True)
class Arch:
    """How to boot a guest of one Debian architecture: QEMU binary, board, devices.

    ``result_argv`` is the QEMU arguments of the probe's result channel, with ``{path}`` the
    host file it is written to (``{opt_path}`` inside a QEMU option list, where a comma must
    be doubled); ``result_device`` is where the guest's /init finds it
    (``port:NAME`` names a virtio-serial port; init looks the name up in sysfs).
    """

    name: str  # Debian architecture, as in binary-NAME/Packages
    binary: str
    uname_machine: str  # what `uname -m` says in the guest (and on a host that can use KVM)
    machine: tuple[str, ...]  # board selection, before the accelerator
    tcg_cpu: str
    console: str  # the kernel's console= device
    append: str  # kernel parameters this architecture's guests always get
    result_argv: tuple[str, ...]
    result_device: str
    guest_modules: tuple[str, ...]  # what kmods loads from the kernel's own package
    channel_modules: tuple[str, ...]  # the result channel's share of it (OOM boots load only it)
    apt_package: str  # the Debian package that provides ``binary``


AMD64 = Arch(
    name="amd64",
    binary=QEMU_BINARY,
    uname_machine="x86_64",
    machine=(),
    # Debian's 7.3 kernel prints nothing and never boots on QEMU's default CPU model.
    # Without ERMS/FSRM the kernel's clear_page, copy_user and glibc's memset/memcpy use
    # unrolled 8-byte moves instead of "rep stosb/movsb", which TCG runs one byte per
    # iteration. Measured (6.12, 2 vCPUs, QEMU 7.2): one accounting pass 20.7 s -> 13.8 s,
    # OOM repeats 25 % shorter. Without SMAP the kernel's user accesses need no STAC/CLAC:
    # TCG gives those a TLB of their own (another MMU index) and ends a translation block at
    # each flip, so every copy from user space (fault_in_readable, 12 % of the guest kernel's
    # samples before) missed. Measured (6.12 alone, QEMU 7.2): one cell's QEMU CPU 93 s ->
    # 74 s. No memory accounting or OOM path depends on these flags (like mitigations=off).
    tcg_cpu="max,-erms,-fsrm,-smap",
    console="ttyS0,115200",
    append="",
    # ttyS0 is the console log; ttyS1, the second 16550 of the pc board, carries results.
    result_argv=("-serial", "file:{path}"),
    result_device="/dev/ttyS1",
    guest_modules=("virtio_pci", "virtio_blk", "ext4"),
    channel_modules=(),
    apt_package="qemu-system-x86",
)

# QEMU 7.2's virt board has a single UART Linux can use, so arm64 results go over a
# virtio-serial port: a plain character device (no tty line discipline to rewrite bytes).
_VIRTIO_SERIAL_RESULT = (
    "-device", "virtio-serial-pci",
    "-chardev", "file,id=kmxresult,path={opt_path}",
    "-device", "virtserialport,chardev=kmxresult,name=kmatrix",
)  # fmt: skip

ARM64 = Arch(
    name="arm64",
    binary="qemu-system-aarch64",
    uname_machine="aarch64",
    # virt: the generic board with PCIe (virtio-*-pci) and a PL011 UART (ttyAMA0).
    machine=("-machine", "virt"),
    # Measured under TCG (QEMU 7.2, Debian 6.12 arm64, boot to init): max 14-15 s (its
    # pointer authentication emulates the QARMA cipher), max,pauth-impdef=on 7 s,
    # cortex-a72 3.5 s. Arm's v8.0 baseline is all a Debian arm64 kernel needs.
    tcg_cpu="cortex-a72",
    console="ttyAMA0",
    # An arm64 kernel with KASLR (Debian's) forces page table isolation on, whatever
    # mitigations=off says ("kernel page table isolation forced ON by KASLR"). KPTI switches
    # the ASID in TTBR1 on every kernel entry and exit, and QEMU's TCG flushes its whole
    # software TLB on every ASID change (target/arm vmsa_ttbr_write). Measured (6.12 arm64,
    # QEMU 7.2, alone): the accounting scenarios 63 s -> 27 s, the cell's guest time 164 s ->
    # 100 s. KPTI only hides kernel mappings from user space; no memory accounting depends
    # on it (amd64's mitigations=off turns its PTI off likewise).
    append="kpti=0",
    result_argv=_VIRTIO_SERIAL_RESULT,
    result_device="port:kmatrix",
    guest_modules=("virtio_pci", "virtio_console", "virtio_blk", "ext4"),
    # Debian 6.1 (bookworm) builds virtio_pci and virtio_console as modules; 6.12+ builds
    # them in (kmods skips built-in ones).
    channel_modules=("virtio_pci", "virtio_console"),
    apt_package="qemu-system-arm",
)

ARCHES = {a.name: a for a in (AMD64, ARM64)}


def arch_for(name: str) -> Arch:
    """The :class:`Arch` of a Debian architecture name (``amd64``, ``arm64``)."""
    try:
        return ARCHES[name]
    except KeyError:
        known = ", ".join(ARCHES)
        raise InfraError(f"no QEMU set-up for architecture {name!r}; known: {known}") from None


def _result_argv(arch: Arch, path: Path) -> list[str]:
    """``arch.result_argv`` for ``path`` (``-serial file:`` takes it verbatim, options do not)."""
    opt_path = str(path).replace(",", ",,")
    return [
        arg.replace("{path}", str(path)).replace("{opt_path}", opt_path) for arg in arch.result_argv
    ]


# Why TcgThread "single" is the default (guest.tcg_thread). Measured (default matrix, 2 cores,
# QEMU 7.2, alternated runs 01:00-01:45): 247-260 s wall with "multi", 215-217 s "single"; the
# expectations held in both. The likely cause: with more vCPU threads than host cores (three
# 2-vCPU guests on 2 cores), a vCPU that waits for another one -- a TLB-shootdown IPI in
# csd_lock_wait, a spinlock whose holder's thread the host preempted -- spins through whole
# host time slices, as TCG gives the guest no paravirtual way to yield; taking turns on one
# thread, the waiting vCPU's turn ends and the other one runs. The guest still has 2 CPUs:
# per-CPU counters and batching are the same, only the interleaving differs (recorded).


@dataclass(frozen=True)
class QemuSpec:
    """Everything that determines one QEMU invocation."""

    vmlinuz: Path
    initrd: Path
    console_log: Path
    result_log: Path
    memory_bytes: int
    # TCG's vCPU threads: "single" runs a guest's vCPUs in turns on one host thread (why:
    # above), "multi" gives each its own; None (KVM's boots): QEMU's own, multi. No default,
    # so no caller can forget the plan's.
    tcg_thread: TcgThread | None
    accel: str = "tcg"
    disk: Path | None = None
    swap: Path | None = None  # a raw image the guest's init formats as swap (serial kmxswap)
    plan: Path | None = None  # the OOM plan disk of a saved or restored boot (serial kmxplan)
    cpus: int = 1
    append: str = ""
    arch: Arch = AMD64
    qmp: Path | None = None  # a QMP socket to create (a boot that is saved: backends.qmp)
    incoming: Path | None = None  # a saved guest state to start from instead of booting


def _append(arch: Arch, spec: QemuSpec) -> str:
    """The kernel command line: console, the base parameters, the arch's, the boot's own."""
    parts = (f"console={arch.console}", BASE_APPEND, arch.append, spec.append)
    return " ".join(part for part in parts if part)


def build_argv(spec: QemuSpec) -> list[str]:
    """The QEMU command line for ``spec``: no network, no display, console and results to files."""
    arch = spec.arch
    accel = (
        ["-accel", "kvm", "-cpu", "host"]
        if spec.accel == "kvm"
        else ["-accel", f"tcg,thread={spec.tcg_thread or 'multi'}", "-cpu", arch.tcg_cpu]
    )
    argv = [
        arch.binary,
        *arch.machine,
        *accel,
        "-m", f"{spec.memory_bytes // (1024 * 1024)}M",
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.vmlinuz),
        "-initrd", str(spec.initrd),
        "-append", _append(arch, spec),
        # The first serial port: the console log, kept per cell. Then the result channel.
        "-serial", f"file:{spec.console_log}",
        *_result_argv(arch, spec.result_log),
    ]  # fmt: skip
    # The guest's init finds each disk by its serial (/sys/block/vdX/serial), never by its
    # name: which one becomes vda is up to the order QEMU creates and Linux probes them.
    disks = ((spec.disk, DISK_SERIAL), (spec.swap, SWAP_SERIAL), (spec.plan, PLAN_SERIAL))
    for image, serial in disks:
        if image is not None:
            argv += [
                "-drive", f"file={image},format=raw,if=none,id={serial},cache=unsafe",
                "-device", f"virtio-blk-pci,drive={serial},serial={serial}",
            ]  # fmt: skip
    # A restored QEMU must have the saved one's devices in the same order (it has: the same
    # spec but for the files behind them); only the state comes from the file.
    if spec.qmp is not None:
        argv += ["-qmp", f"unix:{spec.qmp},server=on,wait=off"]
    if spec.incoming is not None:
        argv += ["-incoming", load_command(spec.incoming)]
    return argv


@dataclass(frozen=True)
class QemuRun:
    """How a QEMU process ended."""

    returncode: int | None
    timed_out: bool
    duration_s: float
    stderr: str


# Every QEMU still running, so an interrupted run can kill them all from the main thread
# (QEMU runs in its own session and would not see the terminal's Ctrl-C itself).
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def kill_all() -> int:
    """Kill every QEMU started by this process and refuse to start new ones; returns count."""
    _STOPPING.set()
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill_group(proc)
    return len(procs)


def default_slots() -> int:
    """QEMUs at once unless told otherwise: one more than the cores.

    TCG guests are CPU-bound, but not all the time: a guest's vCPUs idle while its probe
    sleeps or waits for a role. Measured (default matrix, 2 cores, a host thread per vCPU):
    with 2 slots the QEMUs kept 1.73 cores busy; the same code one run after the other took
    298 s with 2 slots and 276 s with 3. With the vCPUs in turns on one thread (TcgThread),
    4 slots took 231 s against 215-217 s with 3. More would starve guests of CPU time and
    stretch the timers some experiments use (a stall is 1.5 s without progress).
    """
    return (os.cpu_count() or 1) + 1


# How many QEMUs run at once, whoever starts them (cells, a cell's OOM lanes).
_SLOTS = Slots(default_slots())


#: Set by ``--runtime docker`` in each runner container: the container's memory limit
#: allows this many guests at once, whatever the host's core count.
SLOTS_ENV = "KMATRIX_QEMU_SLOTS"
#: Also set in each runner container: the QEMUs the whole run may have at once on the
#: machine (its runner containers at once, each with its SLOTS_ENV).
MACHINE_SLOTS_ENV = "KMATRIX_MACHINE_QEMUS"


def _env_count(name: str) -> int | None:
    """A count the environment sets (a runner container's), None when it sets none."""
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def set_parallel(n: int) -> None:
    """Let at most ``n`` QEMU processes run at once (``--jobs``; default: default_slots()),
    or what KMATRIX_QEMU_SLOTS says."""
    global _SLOTS
    env = _env_count(SLOTS_ENV)
    count = max(1, n if env is None else env)
    # Cells run side by side in threads of one process (local builds in a --runtime docker
    # run) each set it: a new semaphore would let the boots already holding the old one
    # run beside as many again.
    if count != _SLOTS.count:
        _SLOTS = Slots(count)


def slot_count() -> int:
    """How many QEMUs the run may have at once on this machine: this process's (set_parallel),
    or in a runner container all the run's runners' (MACHINE_SLOTS_ENV)."""
    return _env_count(MACHINE_SLOTS_ENV) or _SLOTS.count


def run_qemu(
    argv: list[str],
    timeout: float,
    weight: float = 0.0,
    cancelled: Callable[[], bool] = lambda: False,
    watch: Callable[[], None] | None = None,
) -> QemuRun:
    """Run QEMU to completion or ``timeout`` once a slot is free (set_parallel); QEMU never
    outlives this call (even on Ctrl-C). The timeout and duration start with QEMU.

    ``weight`` is how much the boot will run (scenario runs, OOM repeats): of the boots
    waiting for a slot, the heaviest starts first (backends.slots). Once ``cancelled()`` is
    true (the cell failed elsewhere) a boot still waiting for its slot is not started.
    ``watch`` is called every WATCH_POLL_S while QEMU runs (it may talk to QEMU over QMP;
    what it raises kills QEMU and propagates).
    """
    slots = _SLOTS
    if not slots.acquire(weight, lambda: _STOPPING.is_set() or cancelled()):
        raise InfraError("the run is being interrupted or the cell failed; QEMU was not started")
    try:
        return _run_qemu(argv, timeout, cancelled, watch)
    finally:
        slots.release()


#: How often a running QEMU's caller looks at ``cancelled``.
CANCEL_POLL_S = 0.5
#: How often ``watch`` is called: a boot that waits to be saved waits this long at most.
WATCH_POLL_S = 0.1


def _run_qemu(
    argv: list[str],
    timeout: float,
    cancelled: Callable[[], bool],
    watch: Callable[[], None] | None = None,
) -> QemuRun:
    start = time.monotonic()
    # Start and register under the lock kill_all takes after setting _STOPPING: a QEMU
    # started while a run is being interrupted would otherwise escape the kill.
    with _LIVE_LOCK:
        if _STOPPING.is_set():
            raise InfraError("the run is being interrupted; QEMU was not started")
        if shutil.which(argv[0]) is None:
            hint = _install_hint(argv[0])
            raise InfraError(f"{argv[0]} not found; install QEMU: {hint}")
        # The guard kills QEMU when kmatrix dies (even kill -9) or soon after the timeout
        # (even when kmatrix hangs); its own session keeps the terminal's Ctrl-C away.
        guarded, fds = lifeline.guarded(argv, timeout + GUARD_GRACE_S)
        proc = subprocess.Popen(
            guarded,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            pass_fds=fds,
        )
        _LIVE.add(proc)
    timed_out = stopped = False
    poll = CANCEL_POLL_S if watch is None else WATCH_POLL_S
    try:
        while True:
            left = start + timeout - time.monotonic()
            try:
                # Retrying communicate() after its timeout loses no output (subprocess docs).
                _, err = proc.communicate(timeout=max(0.0, min(poll, left)))
                break
            except subprocess.TimeoutExpired:
                if watch is not None:
                    watch()
                stopped = cancelled()
                if stopped or left <= poll:
                    timed_out = not stopped
                    _kill_group(proc)
                    _, err = proc.communicate()
                    break
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    if _STOPPING.is_set():
        raise InfraError("the run was interrupted; QEMU was killed")
    if stopped:
        raise InfraError("the cell failed elsewhere; this boot of it was stopped")
    return QemuRun(
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        duration_s=round(time.monotonic() - start, 2),
        stderr=err.decode(errors="replace")[-4000:],
    )


def _install_hint(binary: str) -> str:
    package = next((a.apt_package for a in ARCHES.values() if a.binary == binary), None)
    return f"apt-get install {package or 'qemu-system'}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def qemu_version(binary: str = QEMU_BINARY) -> str:
    """QEMU's version line, e.g. ``QEMU emulator version 7.2.22 (Debian ...)``."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except FileNotFoundError:
        raise InfraError(f"{binary} not found; install QEMU: {_install_hint(binary)}") from None
    except (subprocess.SubprocessError, OSError) as exc:
        raise InfraError(f"{binary} --version failed: {exc}") from None
    return out.splitlines()[0].strip() if out else "unknown"


def kvm_smoke_test(vmlinuz: Path, workdir: Path, timeout: float = 20.0) -> bool:
    """Boot ``vmlinuz`` briefly under KVM; True only if the kernel printed its banner.

    Nested KVM on some hosts hangs forever after "Booting from ROM", and ``-cpu host`` can
    abort on an MSR, so /dev/kvm existing proves nothing.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    console = workdir / "kvm-smoke.console.log"
    spec = QemuSpec(
        vmlinuz=vmlinuz,
        initrd=Path("/dev/null"),
        console_log=console,
        result_log=Path("/dev/null"),
        memory_bytes=256 * 1024 * 1024,
        tcg_thread=None,
        accel="kvm",
    )
    # Ahead of every waiting boot: the run's accelerator waits for this answer.
    run_qemu(build_argv(spec), timeout, weight=float("inf"))
    return "Linux version" in read_log(console)


def read_log(path: Path) -> str:
    """What a guest wrote to a console or results log; empty when it wrote nothing."""
    return path.read_text(errors="replace") if path.exists() else ""


def make_swap_image(path: Path, size_bytes: int) -> None:
    """A sparse raw image for guest swap; the guest's init runs mkswap on it (its own page
    size), so nothing here depends on the guest architecture."""
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size_bytes)


def copy_sparse(src: Path, dest: Path, chunk: int = 1 << 20) -> None:
    """Copy a disk image, leaving its all-zero chunks as holes (a formatted swap disk is a
    header and nothing else: each restored boot gets its own copy of it)."""
    size = src.stat().st_size
    # pread at explicit offsets: _data_ranges moves the file position with lseek, which a
    # buffered reader's read-ahead would not notice.
    with src.open("rb", buffering=0) as fin, dest.open("wb") as fout:
        for start, end in _data_ranges(fin.fileno(), size):
            offset = start
            while offset < end and (
                block := os.pread(fin.fileno(), min(chunk, end - offset), offset)
            ):
                if block.count(0) != len(block):
                    fout.seek(offset)
                    fout.write(block)
                offset += len(block)
        fout.truncate(size)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of a file that hold data, by SEEK_DATA/SEEK_HOLE: reading a
    96 MiB swap image whose only data is its header cost ~0.25 s of CPU per restored boot.
    The whole file where the filesystem cannot tell."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                yield pos, size
            return
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, pos


#: The plan disk's size: the same for the saved boot and every restored one (a virtio disk
#: that changed size under a restored guest would be a different device).
PLAN_DISK_BYTES = 64 * 1024


def write_plan_disk(path: Path, content: bytes) -> None:
    """The plan disk: ``content`` (probes/resume.py's format, or nothing), zero-padded."""
    if len(content) > PLAN_DISK_BYTES:
        raise InfraError(f"an OOM plan of {len(content)} bytes does not fit its plan disk")
    with path.open("wb") as f:
        f.write(content)
        f.truncate(PLAN_DISK_BYTES)


def make_disk(path: Path, size_bytes: int) -> None:
    """A fresh sparse ext4 image for the disk-backed O_TMPFILE scenarios (no root needed).

    Lazy inode-table init is off so no ext4lazyinit thread writes in the background while
    the probe measures page-cache numbers.
    """
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size_bytes)
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-m",
        "0",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        str(path),
    ]
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise InfraError("mkfs.ext4 not found; install it: apt-get install e2fsprogs") from None
    except subprocess.CalledProcessError as exc:
        raise InfraError(
            f"mkfs.ext4 {path} failed: {exc.stderr.decode(errors='replace')}"
        ) from None


def allow_start() -> None:
    """Undo :func:`kill_all` at the start of a new run in the same process."""
    _STOPPING.clear()
