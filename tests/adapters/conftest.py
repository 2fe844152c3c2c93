"""A registry process per test module, and a CLI environment pointed at it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.conftest import CliEnv
from tests.fixtures.server import RegistryProcess, start_registry


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    process = start_registry(tmp_path_factory.mktemp("registry") / "home")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def module_cli(server: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> CliEnv:
    """One cache and config for the module (the CLI runs in-process or as a subprocess)."""
    root = tmp_path_factory.mktemp("cli")
    env = {
        "PEFTREG_URL": server.url,
        "PEFTREG_CACHE": str(root / "cache"),
        "PEFTREG_CONFIG": str(root / "config.json"),
        "PEFTREG_RETRIES": "1",
        "PEFTREG_TOKEN": "",
        "PEFTREG_OFFLINE": "",
    }
    return CliEnv(env, root / "cache", root / "config.json")


@pytest.fixture
def cli(server: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliEnv:
    """A fresh cache and config per test, no PEFTREG_* of the caller's environment."""
    for name in list(os.environ):
        if name.startswith("PEFTREG_"):
            monkeypatch.delenv(name)
    env = {
        "PEFTREG_URL": server.url,
        "PEFTREG_CACHE": str(tmp_path / "cache"),
        "PEFTREG_CONFIG": str(tmp_path / "config.json"),
        "PEFTREG_RETRIES": "1",
    }
    return CliEnv(env, tmp_path / "cache", tmp_path / "config.json")
