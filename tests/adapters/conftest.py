"""A module-wide CLI environment pointed at the module's registry (`server`, tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess


@pytest.fixture(scope="module")
def module_cli(server: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> CliEnv:
    """One cache and config for the module (the CLI runs in-process or as a subprocess)."""
    root = tmp_path_factory.mktemp("cli")
    return CliEnv.for_registry(server.url, root, PEFTREG_TOKEN="", PEFTREG_OFFLINE="")
