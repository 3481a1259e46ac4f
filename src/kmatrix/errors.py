"""The kmatrix error hierarchy.

Every error message names the thing that is wrong and the next step. ``exit_code`` follows
the tool's contract: 1 when an expectation failed, 2 when the tool could not run.
"""

from __future__ import annotations


class KmatrixError(Exception):
    """Base class of every error kmatrix raises on purpose."""

    exit_code = 2


class UserError(KmatrixError):
    """Bad input: matrix.yaml, a command-line option, a missing package name. The user fixes it."""


class InfraError(KmatrixError):
    """The environment failed: network, mirror, signature, QEMU, Docker. Retry or fix the host."""


class VerificationError(InfraError):
    """A signature or checksum did not match; the offending file has been deleted."""


class ExpectationFailed(KmatrixError):
    """A measured result contradicts an expectation declared in matrix.yaml."""

    exit_code = 1
