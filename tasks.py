"""invoke's entry point in a checkout: the tasks live in kmatrix.tasks.

The same collection is the installed ``kmatrix`` command (kmatrix.cli), so ``invoke matrix``
here and ``kmatrix matrix`` elsewhere are one implementation.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: kmatrix is imported from src/.
sys.path.insert(0, str(Path(__file__).parent / "src"))

from kmatrix.tasks import ns

__all__ = ["ns"]
