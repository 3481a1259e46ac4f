"""Checking an InRelease signature with ``gpgv`` (and reading what gpgv reports)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from kmatrix.errors import InfraError, VerificationError

_CLEARSIGN_BEGIN = "-----BEGIN PGP SIGNED MESSAGE-----"


def parse_gpgv_status(status: str) -> tuple[list[str], list[str]]:
    """Return (fingerprints with a VALIDSIG, problem lines) from ``gpgv --status-fd`` output.

    A problem is BADSIG, ERRSIG, EXPKEYSIG, REVKEYSIG or NO_PUBKEY; a valid signature from a
    key in the keyring is enough as long as no signature is outright bad (BADSIG).
    """
    valid: list[str] = []
    problems: list[str] = []
    for line in status.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "[GNUPG:]":
            continue
        if parts[1] == "VALIDSIG":
            valid.append(parts[2])
        elif parts[1] in ("BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG", "NO_PUBKEY"):
            problems.append(" ".join(parts[1:3]))
    return valid, problems


def gpgv_verify(signed: Path, keyring: Path, timeout: float = 60.0) -> tuple[str, list[str]]:
    """Verify a clearsigned file with gpgv; return (signed text, valid fingerprints).

    Raises VerificationError on a bad or missing signature, InfraError if gpgv or the
    keyring is missing. The text returned is what gpgv says was signed, nothing else.
    """
    hint = "install them with `apt-get install gpgv debian-archive-keyring`"
    if not keyring.is_file():
        raise InfraError(f"the archive keyring {keyring} does not exist; {hint}")
    with tempfile.TemporaryDirectory(prefix="kmatrix-gpgv-") as tmpdir:
        out = Path(tmpdir) / "signed.txt"
        cmd = [
            "gpgv", "--homedir", tmpdir, "--keyring", str(keyring.resolve()),
            "--status-fd", "1", "--output", str(out), str(signed),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise InfraError(f"gpgv is not installed; {hint}") from None
        except subprocess.TimeoutExpired:
            raise InfraError(f"gpgv did not finish within {timeout:.0f}s on {signed}") from None
        valid, problems = parse_gpgv_status(proc.stdout)
        if not valid or any(p.startswith("BADSIG") for p in problems) or not out.exists():
            stderr_tail = (proc.stderr.strip().splitlines() or ["no signature"])[-1]
            detail = "; ".join(problems) or stderr_tail
            raise VerificationError(f"{signed}: no good signature from {keyring} ({detail})")
        return out.read_text(encoding="utf-8"), valid


def require_clearsigned(path: Path, url: str) -> None:
    """An unsigned InRelease gets its own message: gpgv's ("no valid OpenPGP data") is obscure."""
    with open(path, "rb") as f:
        head = f.read(len(_CLEARSIGN_BEGIN) + 3).lstrip()
    if not head.startswith(_CLEARSIGN_BEGIN.encode()):
        raise VerificationError(
            f"{url} is not signed (no '{_CLEARSIGN_BEGIN}' header); kmatrix uses only signed "
            "archives: sign the Release file into InRelease (gpg --clearsign) and give its "
            "public key as `keyring:`"
        )
