"""The result cache: a finished cell is reused when nothing that determines it changed.

The key covers the cell name, the kernel (package SHA256; for a local build the bzImage,
modules tree and .config together), the guest userland, the probe and init, the probe/OOM
parameters, the guest's memory, /dev/shm size, vCPUs and (under TCG) how they run, the
accelerator and the QEMU version. Only
complete ``ok`` cells are cached: a timeout may be the host's fault, and a cell with an OOM
experiment in error is incomplete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kmatrix.artifacts import sha256_of
from kmatrix.results.contract import Cell
from kmatrix.results.schema import JSON, atomic_write_bytes, atomic_write_text, mark_incomplete

# Bump when the cell format or what a cell measures changes without its inputs changing.
# 2: entries carry digests of the cell and its console log.
CELL_FORMAT = 2


def cell_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a cell's result."""
    blob = json.dumps({"format": CELL_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _digest(cell: Cell) -> str:
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()


class CellCache:
    """Cached cells (results.json cell dicts) and their console logs, by key.

    Each entry is ``{"sha256": ..., "console_sha256": ..., "cell": {...}}``: the digests are
    taken when the cell is stored and checked at every read, so an edited or truncated
    entry (or console log) is dropped and the cell is measured again, never served.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> tuple[Cell, Path | None] | None:
        """The cached cell and its console log, or None (a damaged entry counts as absent)."""
        path = self.root / f"{key}.json"
        console = self.root / f"{key}.console.log"
        try:
            entry = json.loads(path.read_text())
            # Not validated against the contract: the digest says it is the cell we stored.
            cell: Cell = entry["cell"]
            want_console = entry.get("console_sha256")
            intact = isinstance(cell, dict) and entry["sha256"] == _digest(cell)
            if intact and want_console is not None:
                intact = sha256_of(console) == want_console
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            self._drop(key)
            return None
        # Entries from before the incomplete status: an OOM error means it is not complete.
        if mark_incomplete(cell).get("status") != "ok":
            self._drop(key)
            return None
        return cell, console if want_console is not None else None

    def _drop(self, key: str) -> None:
        for suffix in (".json", ".console.log"):
            (self.root / f"{key}{suffix}").unlink(missing_ok=True)

    def put(self, key: str, cell: Cell, console: Path | None) -> None:
        """Store a complete ``ok`` cell (others are ignored: they are rerun next time)."""
        if mark_incomplete(cell).get("status") != "ok":
            return
        self.root.mkdir(parents=True, exist_ok=True)
        entry: JSON = {"sha256": _digest(cell), "cell": cell, "console_sha256": None}
        if console is not None and console.exists():
            dest = self.root / f"{key}.console.log"
            atomic_write_bytes(dest, console.read_bytes())
            entry["console_sha256"] = sha256_of(dest)
        atomic_write_text(self.root / f"{key}.json", json.dumps(entry, sort_keys=True))
