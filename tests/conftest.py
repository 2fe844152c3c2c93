"""Fixtures shared by every tier: a real registry process on SQLite + filesystem."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result

from tests.fixtures.cli import CliEnv
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One embedded-default registry per test module (a folder or module may define its own)."""
    process = start_registry(tmp_path_factory.mktemp("registry") / "home")
    yield process
    process.stop()


@pytest.fixture
def cli(server: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliEnv:
    """The CLI against the module's `server`: a fresh cache and config per test, and no
    PEFTREG_* variable of the caller's environment."""
    for name in list(os.environ):
        if name.startswith("PEFTREG_"):
            monkeypatch.delenv(name)
    return CliEnv.for_registry(server.url, tmp_path)


@pytest.fixture
def run(
    registry_server: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Result]:
    """`peftreg ARGS` in-process against the test's own `registry_server`."""
    for name in list(os.environ):
        if name.startswith("PEFTREG_"):
            monkeypatch.delenv(name)
    return CliEnv.for_registry(registry_server.url, tmp_path / "cli").run


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
