"""The reaper: runs a clean-up command if kmatrix dies (or overruns) before cleaning up.

Run as ``python3 -I -S reaper.py LIFELINE_FD DEADLINE_S CMD...`` in its own session
(stdlib only). It waits on the lifeline pipe; EOF means kmatrix is gone (even ``kill -9``),
and CMD (e.g. ``docker rm -f ID``) removes what kmatrix left running. After DEADLINE_S it
runs CMD too: no container outlives its cell's timeout. When kmatrix removes the container
itself, it kills the reaper, which then never runs CMD.
"""

from __future__ import annotations

import select
import subprocess
import sys


def main(args: list[str]) -> int:
    """Wait for EOF on the lifeline or the deadline, then run the clean-up command."""
    lifeline, deadline, cleanup = int(args[0]), float(args[1]), args[2:]
    # Nobody ever writes to the pipe: readable means EOF, i.e. kmatrix has exited.
    select.select([lifeline], [], [], deadline)
    return subprocess.run(cleanup, stdout=subprocess.DEVNULL, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
