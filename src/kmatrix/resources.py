"""Where kmatrix finds its own files: probes/ and images/ from a checkout or the installed package.

A checkout (``src/kmatrix`` next to top-level ``probes/`` and ``images/``) uses those folders
directly, so an edit to the probe takes effect without reinstalling. An installed wheel carries
copies of them as package data under ``kmatrix/data/`` (setup.py copies them at build time; the
top-level folders stay the only source).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: The checkout root when kmatrix runs from one (src/kmatrix -> the repository).
CHECKOUT_DIR = PACKAGE_DIR.parents[1]
#: The package data of an installed wheel.
PACKAGE_DATA_DIR = PACKAGE_DIR / "data"


def is_checkout(root: Path = CHECKOUT_DIR) -> bool:
    """True when ``root`` is a kmatrix checkout: its probes/ and images/ next to src/kmatrix."""
    return (root / "probes" / "probe.py").is_file() and (root / "images" / "guest").is_dir()


def data_root() -> Path:
    """The directory holding probes/ and images/: the checkout, else the package data."""
    return CHECKOUT_DIR if is_checkout() else PACKAGE_DATA_DIR
