"""Fixtures shared by every tier: a real registry process on SQLite + filesystem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.server import RegistryProcess, start_registry

ADMIN_TOKEN = "test-admin-token"


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
        {"PEFTREG_ANONYMOUS": "none", "PEFTREG_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    yield server
    server.stop()
