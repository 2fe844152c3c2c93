"""A real `peftreg serve` that logs JSON lines at INFO (the shared fixture logs warnings only)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.server import RegistryProcess, clean_environment


class JsonLoggingRegistry(RegistryProcess):
    def start(self) -> RegistryProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "PEFTREG_HOME": str(self.home), "PEFTREG_PORT": str(self.port)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "peftreg.cli.main", "serve", "--log-level", "info"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self


@pytest.fixture(scope="package")
def json_logging_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    home: Path = tmp_path_factory.mktemp("observability") / "home"
    env = {**clean_environment(), "PEFTREG_LOG_FORMAT": "json"}
    server = JsonLoggingRegistry(home=home, env=env).start()
    yield server
    server.stop()
