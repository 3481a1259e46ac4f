"""The result cache: a finished cell is reused when nothing that determines it changed.

The key covers the cell name, the kernel (package SHA256; for a local build the bzImage,
modules tree and .config together), the guest userland, the probe and init, the probe/OOM
parameters, guest memory and /dev/shm size, the accelerator and the QEMU version. Only ``ok``
cells are cached: a timeout may be the host's fault.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from kmatrix.results import JSON, atomic_write_text

# Bump when the cell format or what a cell measures changes without its inputs changing.
CELL_FORMAT = 1


def cell_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a cell's result."""
    blob = json.dumps({"format": CELL_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class CellCache:
    """Cached cells (results.json cell dicts) and their console logs, by key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> tuple[JSON, Path | None] | None:
        """The cached cell and its console log, or None (a damaged entry counts as absent)."""
        path = self.root / f"{key}.json"
        try:
            cell = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(cell, dict) or cell.get("status") != "ok":
            return None
        console = self.root / f"{key}.console.log"
        return cell, console if console.exists() else None

    def put(self, key: str, cell: JSON, console: Path | None) -> None:
        """Store an ``ok`` cell (others are ignored)."""
        if cell.get("status") != "ok":
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if console is not None and console.exists():
            shutil.copyfile(console, self.root / f"{key}.console.log")
        atomic_write_text(self.root / f"{key}.json", json.dumps(cell, sort_keys=True))
