"""A registry process per test module, and a CLI environment pointed at it."""

from __future__ import annotations

from collections.abc import Iterator

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
