"""The ``kmatrix`` command: invoke's Program over the task collection of kmatrix.tasks."""

from __future__ import annotations

from invoke.program import Program

from kmatrix import __version__
from kmatrix.tasks import ns

#: ``kmatrix --list``, ``kmatrix matrix --matrix-file my.yaml``...: the tasks of tasks.py.
program = Program(namespace=ns, name="kmatrix", binary="kmatrix", version=__version__)


def main() -> None:
    """Entry point of the ``kmatrix`` console script."""
    program.run()
