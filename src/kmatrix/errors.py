"""The kmatrix error hierarchy.

Every error message names the thing that is wrong and the next step. ``exit_code`` follows
the tool's contract: 1 when an expectation failed, 2 when the tool could not run.

The two branches a user acts on are :class:`UserError` (fix the input) and
:class:`InfraError` (fix or retry the environment). The leaf classes below exist because
some caller tells them apart from their parent: each says who catches it.
"""

from __future__ import annotations


class KmatrixError(Exception):
    """Base class of every error kmatrix raises on purpose."""

    exit_code = 2


class UserError(KmatrixError):
    """Bad input: matrix.yaml, a command-line option, a missing package name. The user fixes it."""


class InfraError(KmatrixError):
    """The environment failed: network, mirror, signature, QEMU, Docker. Retry or fix the host."""


class ExpectationFailed(KmatrixError):
    """A measured result contradicts an expectation declared in matrix.yaml."""

    exit_code = 1


# --- leaves ---------------------------------------------------------------------------------


class VerificationError(InfraError):
    """A signature or checksum did not match; the offending file has been deleted.

    Caught by the archive client, which retries a cached InRelease that no longer verifies.
    """


class SuiteNotFound(UserError):
    """The archive answered, but has no such suite (its InRelease is not there).

    Caught by kmatrix.debian.suites: an implied suite (bookworm-updates) may be missing.
    """


class CacheCorrupted(InfraError):
    """A cached artifact no longer matches the digest recorded when it was made."""


class RunLocked(UserError):
    """Another kmatrix run holds the report name or work directory."""


class EngineUnavailable(InfraError):
    """No Docker engine answered.

    Caught by docker cells, which are skipped (or errors under ``require_docker``).
    """


class QemuFailedToStart(InfraError):
    """QEMU exited with an error before the guest printed anything (its stderr says why)."""
