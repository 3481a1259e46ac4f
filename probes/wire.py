"""The KMX1 record stream: how the probe's records reach the host.

Every record is one line ``KMX1 <compact json> <crc32 of the json, 8 hex digits>\\n``,
written with one ``os.write`` to an unbuffered fd: stdout (containers) or ``--out`` (the
guest's second serial port, or a virtio-serial port). A tty given as ``--out`` is
switched to no output post-processing, so lines end in ``\\n``, not ``\\r\\n``. The host
parses the stream with kmatrix.results.schema.parse_probe_output.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import termios
import zlib
from typing import Any

RECORD_PREFIX = b"KMX1 "


class Output:
    """Unbuffered record stream: every record is one line written with one os.write."""

    def __init__(self, path: str | None) -> None:
        if path is None:
            sys.stdout.flush()
            self.fd = sys.stdout.fileno()
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOCTTY
            self.fd = os.open(path, flags, 0o644)
            if os.isatty(self.fd):
                _raw_output(self.fd)

    def emit(self, record: dict[str, Any]) -> None:
        """Write one ``KMX1 <json> <crc32>`` line.

        The CRC lets the host reject a record that kernel messages or a dying serial line
        garbled even where the damage still parses as JSON (e.g. inside a string).
        """
        line = json.dumps(record, separators=(",", ":"), sort_keys=False).encode()
        crc = b"%08x" % zlib.crc32(line)
        write_all(self.fd, RECORD_PREFIX + line + b" " + crc + b"\n")


def _raw_output(fd: int) -> None:
    """Turn off output post-processing (\\n -> \\r\\n) on a serial port used for records."""
    attrs = termios.tcgetattr(fd)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def drain(fd: int) -> None:
    """Wait until every record written to ``fd`` has left the guest (the next thing may be
    a panic). termios.error is not an OSError. A virtio-serial port (arm64) is no tty and
    has nothing to drain: under TCG its virtqueue kick traps into QEMU, which writes the
    bytes to the host file before the guest's write() returns."""
    with contextlib.suppress(OSError, termios.error):
        termios.tcdrain(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of ``data`` is written (one call unless the fd is short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
