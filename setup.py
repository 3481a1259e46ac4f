"""Build hook: ship the top-level probes/ and images/ inside the package as kmatrix/data/.

They stay the only source (a checkout uses them in place, see kmatrix.resources); the wheel
gets copies so an installed ``kmatrix`` finds them without a checkout. Everything else about
the package is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_DIRS = ("probes", "images")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


class BuildPyWithData(build_py):
    """build_py, then probes/ and images/ copied into the built package's data/ folder."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the checkout, which has the folders
        for name in DATA_DIRS:
            target = Path(self.build_lib) / "kmatrix" / "data" / name
            shutil.rmtree(target, ignore_errors=True)
            # copytree keeps the mode bits: images/guest/init stays executable.
            shutil.copytree(ROOT / name, target, ignore=IGNORE)


setup(cmdclass={"build_py": BuildPyWithData})
