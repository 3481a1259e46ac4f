"""Run a matrix's OOM boots on its one Debian kernel (for the QEMU integration tests)."""

from __future__ import annotations

from pathlib import Path

from kmatrix.cells.oom_boots import OomRun, run_oom_boots
from kmatrix.config import parse_matrix
from kmatrix.debian.archive import default_cache_dir
from kmatrix.debian.suites import Resolver
from kmatrix.guest.kernels import prepare_debian
from kmatrix.guest.userland import build_userland
from kmatrix.results.contract_oom import OomBoot
from kmatrix.run.plan import qemu_plan


def run_oom_matrix(text: str, workdir: Path) -> OomRun:
    """Resolve, fetch and prepare the matrix's only kernel, then run its OOM boots (TCG)."""
    matrix = parse_matrix(text)
    cache = default_cache_dir()
    resolver = Resolver(matrix, cache)
    archive = resolver.main_archive("amd64")
    (k,) = matrix.kernels
    kernel = prepare_debian(archive, k, resolver.resolve(k), cache)
    userland = build_userland(archive, matrix.guest.suite, cache, lambda _: None)
    return run_oom_boots(kernel, userland, qemu_plan(matrix, k, "tcg"), workdir)


def measured_boots(boots: list[OomBoot]) -> list[OomBoot]:
    """The boots whose probe said hello. Debian's kernels under TCG with 2 vCPUs now and then
    Oops before the probe starts; cells/oom_boots.py boots those again (EARLY_CRASH_RETRIES),
    so a test that counts boots counts the others, after checking that is all they were."""
    early = [b for b in boots if b["mem_total"] is None]
    assert all(b.get("panic") and b["finished"] == 0 for b in early), early
    return [b for b in boots if b["mem_total"] is not None]
