"""The pruned guest userland keeps every stdlib module the probe imports.

kmatrix.guest.userland.prune drops stdlib packages and extension modules to keep the
in-RAM initrd small; a probe module that starts importing one of them would fail only in
the guests. The list of what the probe imports is the one the userland build itself uses
(_IMPORTS_SCRIPT, run with this Python 3.11).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kmatrix.guest import userland


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the guest runs Python 3.11")
def test_nothing_the_probe_imports_is_pruned() -> None:
    script = userland._IMPORTS_SCRIPT.replace('.endswith(".py")', '.endswith((".py", ".so"))')
    run = subprocess.run(
        [sys.executable, "-I", "-c", script, str(userland.PROBES_DIR)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    imported = run.stdout.split()
    assert "json/__init__.py" in imported and "argparse.py" in imported  # the list is real
    pruned_dirs = [p for p in userland._PRUNE if p.startswith("usr/lib/python3.11/")]
    bad = [
        rel
        for rel in imported
        if any(f"usr/lib/python3.11/{rel}".startswith(d + "/") for d in pruned_dirs)
        or userland._PRUNE_EXTENSIONS.match(rel.rsplit("/", 1)[-1])
    ]
    assert bad == []


def test_the_extension_pattern_spares_what_the_probe_loads() -> None:
    keep = ("_ctypes", "_json", "mmap", "_socket", "select", "fcntl", "_posixsubprocess")
    for name in keep:
        assert not userland._PRUNE_EXTENSIONS.match(f"{name}.cpython-311-x86_64-linux-gnu.so")
    assert userland._PRUNE_EXTENSIONS.match("_testcapi.cpython-311-aarch64-linux-gnu.so")
