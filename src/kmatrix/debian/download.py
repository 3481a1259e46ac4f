"""Downloading one URL (http, https or file) atomically, with retries."""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kmatrix.debian.sources import MIRROR_HINT
from kmatrix.errors import InfraError

RETRIES = 3
BACKOFF_SECONDS = 1.0
_CHUNK = 1 << 20


class NotFound(Exception):
    """The URL does not exist (HTTP 404/410 or a missing file:// path).

    Not a KmatrixError: the archive client turns it into the error that names the suite or
    package it was looking for.
    """


def _download_once(url: str, dest: Path, timeout: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "kmatrix"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, _CHUNK)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise NotFound(url) from e
        raise
    except urllib.error.URLError as e:
        if isinstance(e.reason, FileNotFoundError):
            raise NotFound(url) from e
        raise


def download(
    url: str, dest: Path, timeout: float, log: Callable[[str], None], hint: str = MIRROR_HINT
) -> None:
    """Download ``url`` atomically to ``dest`` with retries; raises NotFound or InfraError.

    ``hint`` says which setting chooses the archive, for the error when it cannot be reached.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        for attempt in range(RETRIES + 1):
            try:
                log(f"downloading {url}")
                _download_once(url, tmp, timeout)
                os.replace(tmp, dest)
                return
            except (OSError, http.client.HTTPException) as e:
                if attempt == RETRIES:
                    raise InfraError(
                        f"cannot download {url} after {RETRIES + 1} attempts: {e}; "
                        f"check the network and the archive ({hint} to change it)"
                    ) from e
                log(f"download of {url} failed ({e}); retrying")
                time.sleep(BACKOFF_SECONDS * 2**attempt)
    finally:
        tmp.unlink(missing_ok=True)
