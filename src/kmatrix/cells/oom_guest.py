"""What an OOM guest of a QEMU cell is made of: its /init arguments, modules, swap disk and
QEMU spec (pure but for the files it writes). Used by the booted OOM boots (oom_boots.py)
and by the saved boot they are restored from (oom_saved.py).
"""

from __future__ import annotations

from pathlib import Path

from kmatrix.backends.qemu import QemuSpec, arch_for, make_swap_image
from kmatrix.catalog import NEEDS_SWAP
from kmatrix.cells.plan import QemuPlan
from kmatrix.guest.kernels import PreparedKernel
from kmatrix.guest.kmods import Module, modules_to_load
from kmatrix.results.oom import Unit

#: /dev/shm size= in the OOM boots, as a fraction of guest memory: large enough for the
#: tmpfile-shm and shm-named holders (40 % of MemTotal), so ENOSPC never ends them early.
SHM_FRACTION = 0.9
#: "quiet" keeps the boot off the slow serial console; init raises the loglevel again.
OOM_APPEND = "quiet"
#: The OOM boots' swap disk, as a fraction of oom.memory: room for the swapped holder (half
#: of MemAvailable) and little more, so the hog that fills RAM and swap is done quickly.
OOM_SWAP_FRACTION = 1 / 3
#: What the swap and plan disks need where the kernel builds it as modules (Debian cloud).
DISK_MODULES = ("virtio_pci", "virtio_blk")


def plan_arg(units: list[Unit]) -> str:
    """The probe's ``--oom`` argument: ``name:first-last`` per run of consecutive repeats."""
    parts: list[str] = []
    for name in dict.fromkeys(u.name for u in units):
        reps = sorted(u.repeat for u in units if u.name == name)
        start = prev = reps[0]
        for r in [*reps[1:], None]:
            if r is not None and r == prev + 1:
                prev = r
                continue
            parts.append(f"{name}:{start}-{prev}")
            if r is not None:
                start = prev = r
    return ",".join(parts)


def oom_args(plan: QemuPlan, units: list[Unit], swap: bool, saved: bool) -> dict[str, str]:
    """What an OOM boot's /init reads from /kmatrix/args (``saved``: wait for a plan disk)."""
    cfg = plan.oom
    return {
        "KMX_MODE": "oom",
        "KMX_RESULT_DEV": arch_for(plan.arch).result_device,
        "KMX_OOM": plan_arg(units),
        "KMX_OOM_REPEATS": str(cfg.repeats),
        "KMX_OOM_TIMEOUT": str(cfg.timeout_s),
        "KMX_SHM_SIZE": str(int(cfg.memory_bytes * SHM_FRACTION)),
        "KMX_SIZE_MIB": "0",
        "KMX_SCENARIOS": "",
        "KMX_SWAP": "1" if swap else "0",
        "KMX_SNAPSHOT": "1" if saved else "0",
    }


def oom_spec(plan: QemuPlan, image: Path, initrd: Path, workdir: Path, name: str) -> QemuSpec:
    """An OOM boot's QEMU, its logs named after ``name``; the caller adds its disks."""
    return QemuSpec(
        vmlinuz=image,
        initrd=initrd,
        console_log=workdir / f"{name}.console.log",
        result_log=workdir / f"{name}.results.log",
        memory_bytes=plan.oom.memory_bytes,
        accel=plan.accel,
        tcg_thread=plan.tcg_thread,
        cpus=plan.cpus,
        append=f"{OOM_APPEND} {plan.cmdline}".strip(),
        arch=arch_for(plan.arch),
    )


def oom_swap_bytes(plan: QemuPlan, units: list[Unit]) -> int:
    """The swap disk an OOM boot of ``units`` gets (0: none)."""
    if not any(u.name in NEEDS_SWAP for u in units):
        return 0
    return min(plan.swap_bytes, int(plan.oom.memory_bytes * OOM_SWAP_FRACTION))


def swap_image(workdir: Path, size: int, name: str = "swap.img") -> Path | None:
    """A fresh swap disk of ``size`` bytes for one boot, or None when ``size`` is 0."""
    if not size:
        return None
    path = workdir / name
    make_swap_image(path, size)
    return path


def boot_modules(kernel: PreparedKernel, disks: bool) -> list[Module]:
    """The result channel's modules, where the kernel builds them as modules (arm64 6.1),
    and the virtio disks' when the boot has a swap or plan disk."""
    wanted = arch_for(kernel.arch).channel_modules + (DISK_MODULES if disks else ())
    return modules_to_load(kernel.modules_dir, wanted) if wanted and kernel.modules_dir else []
