"""Save a running QEMU guest to a file over QMP, so other QEMUs can start from it.

An OOM boot of a cell is booted once to the point where the probe is ready and waits for
its plan (probes/resume.py); this module stops that guest, migrates its whole state to a
file (QEMU's ``exec:`` migration, no disk images involved) and quits QEMU. Every lane of
the cell's OOM boots then starts QEMU with ``-incoming`` on that file (kmatrix.backends.qemu
``QemuSpec.incoming``) instead of booting the kernel again: under TCG a boot to the probe
costs about 6 s of CPU, a restore well under one.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import time
from pathlib import Path
from typing import Any

from kmatrix.errors import InfraError

#: QEMU 7.2 migrates at 32 MiB/s unless told otherwise; the file is local.
MAX_BANDWIDTH = 1 << 40
POLL_S = 0.05
#: What to do instead, named in every error of a saved boot.
FALLBACK_HINT = "the OOM lanes boot the kernel instead (oom.snapshot: false does so always)"


def save_command(part: Path, dest: Path) -> str:
    """The ``migrate`` URI that writes the state to ``part`` and renames it to ``dest`` once
    complete: QEMU reports the migration done when it has written the last byte into the
    pipe, not when ``cat`` has written it to the file, so ``dest`` appearing is the sign."""
    tmp, final = shlex.quote(str(part)), shlex.quote(str(dest))
    return f"exec:cat > {tmp} && mv {tmp} {final}"


def load_command(path: Path) -> str:
    """The ``-incoming`` URI that reads the state from ``path``."""
    return f"exec:cat {shlex.quote(str(path))}"


class _Client:
    """One QMP connection: commands in, their answers out (events are skipped)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
            self._file = self._sock.makefile("rw", encoding="utf-8")
            self._read()  # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise InfraError("QEMU closed its QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command; its ``return`` value, or InfraError with QEMU's words."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request) + "\n")
        self._file.flush()
        while True:
            message = self._read()
            if "error" in message:
                desc = message["error"].get("desc", message["error"])
                raise InfraError(f"QEMU refused {command}: {desc}; {FALLBACK_HINT}")
            if "return" in message:
                return message["return"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def save_and_quit(qmp: Path, dest: Path, timeout: float) -> float:
    """Write the state of the guest behind the QMP socket ``qmp`` to ``dest`` (through
    ``dest``.part, renamed once complete), then quit QEMU; the seconds the migration took.

    InfraError when QEMU cannot be reached or the migration fails or takes over ``timeout``
    seconds (QEMU is still asked to quit; the caller's run_qemu kills it otherwise).
    """
    try:
        client = _Client(qmp, timeout)
    except (OSError, ValueError) as exc:
        raise InfraError(f"cannot talk to QEMU over {qmp}: {exc}; {FALLBACK_HINT}") from None
    try:
        return _save(client, dest, timeout)
    except (OSError, ValueError) as exc:
        raise InfraError(f"saving the guest to {dest} failed: {exc}; {FALLBACK_HINT}") from None
    finally:
        with contextlib.suppress(OSError, ValueError, InfraError):  # QEMU may be gone already
            client.execute("quit")
        client.close()


def _save(client: _Client, dest: Path, timeout: float) -> float:
    start = time.monotonic()
    # Not stopped first: the run state travels with the migration, and a guest saved while
    # stopped would stay stopped when restored. The guest only polls; the migration stops it
    # for the last pass on its own, so the state is consistent.
    client.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    client.execute("migrate", uri=save_command(dest.with_name(dest.name + ".part"), dest))
    while True:
        status = client.execute("query-migrate")
        state = status.get("status")
        if state == "completed":
            return round(time.monotonic() - start, 2)
        if state in ("failed", "cancelled"):
            why = status.get("error-desc", "no reason given")
            raise InfraError(f"QEMU's migration to {dest} {state}: {why}; {FALLBACK_HINT}")
        if time.monotonic() - start > timeout:
            raise InfraError(
                f"saving the guest to {dest} took over {timeout:.0f} s; {FALLBACK_HINT}"
            )
        time.sleep(POLL_S)
