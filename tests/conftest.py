"""Shared test set-up: import kmatrix from src/ without installing it; the Docker engine."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


@pytest.fixture(scope="session")
def docker_client() -> Any:
    """A client of the local Docker engine, or a skip that says how to get one.

    Under KMATRIX_REQUIRE_DOCKER=1 (CI, where the set-up script started an engine) a missing
    engine is a failure instead: there it means the set-up broke, not that the machine lacks one.
    """
    from kmatrix.backends import docker as engine

    try:
        return engine.connect()
    except engine.EngineUnavailable as exc:
        message = (
            f"{exc}. Start one with `bash scripts/setup.sh` (it starts dockerd when none "
            "answers), or deselect these tests with -m 'not docker'"
        )
        if os.environ.get("KMATRIX_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)
