"""Binary size units, the one copy every package uses (kmatrix imports nothing here).

Sizes in kmatrix are bytes throughout (matrix.yaml sizes, results metrics, guest memory);
these are the factors to write and show them in KiB, MiB and GiB.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
