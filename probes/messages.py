"""JSON-line messages over pipes between the probe and the processes it forks.

A scenario child (scenario_child.py) and the OOM roles (oom_roles.py) report ``ready``,
results and progress to the probe as one compact JSON object per line; a
:class:`Channel` reads them with a deadline, or whatever has arrived so far. An OSError
travels as its errno name (:func:`errno_name`).
"""

from __future__ import annotations

import errno
import json
import os
import select
import time
from dataclasses import dataclass
from typing import Any

from wire import write_all

Message = dict[str, Any]


class ProtocolError(Exception):
    """The child did not follow the protocol (died early, timed out, bad message)."""


def errno_name(exc: OSError) -> str:
    """Symbolic name of an OSError's errno (``"ENOSPC"``), or the number as text."""
    if exc.errno is None:
        return type(exc).__name__
    return errno.errorcode.get(exc.errno, str(exc.errno))


@dataclass
class Channel:
    """JSON-line messages read from a pipe, with a deadline."""

    fd: int
    buffer: bytes = b""

    def receive(self, deadline: float, phase: str) -> Message:
        """Return the next message; raise ProtocolError on EOF or timeout."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise ProtocolError(f"timeout waiting for {phase}")
            data = os.read(self.fd, 65536)
            if not data:
                raise ProtocolError(f"child exited before sending {phase}")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        message: Message = json.loads(line)
        return message

    def read_available(self) -> list[Message] | None:
        """Messages now readable (one read, the fd must be ready); None at EOF (the
        process has exited)."""
        data = os.read(self.fd, 65536)
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line]


def send(fd: int, message: Message) -> None:
    """Send one JSON-line message."""
    write_all(fd, json.dumps(message, separators=(",", ":")).encode() + b"\n")
