"""Run a matrix's OOM boots on its one Debian kernel (for the QEMU integration tests)."""

from __future__ import annotations

from pathlib import Path

from kmatrix.config import parse_matrix
from kmatrix.debian import default_cache_dir
from kmatrix.guest import build_userland
from kmatrix.kernels import prepare_debian
from kmatrix.oom_cell import OomRun, run_oom_boots
from kmatrix.suites import Resolver


def run_oom_matrix(text: str, workdir: Path) -> OomRun:
    """Resolve, fetch and prepare the matrix's only kernel, then run its OOM boots (TCG)."""
    matrix = parse_matrix(text)
    cache = default_cache_dir()
    resolver = Resolver(matrix, cache)
    archive = resolver.main_archive("amd64")
    (k,) = matrix.kernels
    kernel = prepare_debian(archive, k, resolver.resolve(k), cache)
    userland = build_userland(archive, matrix.guest.suite, cache, lambda _: None)
    return run_oom_boots(kernel, userland, matrix, workdir, "tcg")
