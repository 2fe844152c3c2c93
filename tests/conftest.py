"""Fixtures shared by every tier: a real registry process on SQLite + filesystem."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.server import RegistryProcess, start_registry

ADMIN_TOKEN = "test-admin-token"

# Nothing is downloaded at test time: transformers and peft never ask a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture
def registry_server(tmp_path: Path) -> Iterator[RegistryProcess]:
    """The embedded default: SQLite + filesystem, anonymous access on loopback."""
    server = start_registry(tmp_path / "home")
    yield server
    server.stop()


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[RegistryProcess]:
    """A registry that needs tokens: anonymous access off, a bootstrap admin token."""
    server = start_registry(
        tmp_path / "home",
        {
            "PEFTREG_ANONYMOUS": "none",
            "PEFTREG_ADMIN_TOKEN": ADMIN_TOKEN,
            "PEFTREG_EMBEDDED_WORKER": "false",  # jobs stay queued: nothing runs them
        },
    )
    yield server
    server.stop()
