from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from peftreg.cli.main import cli
from peftreg.registry.app import build_services
from peftreg.registry.db.migrate import upgrade
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from tests.fixtures.postgres import fresh_database, postgres_admin_url
from tests.fixtures.server import RegistryProcess


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    """Migrated services (database + filesystem store) on each database backend."""
    if request.param == "sqlite":
        settings = Settings(home=tmp_path / "home", embedded_worker=False)
        yield build_services(settings)
        return
    with fresh_database(postgres_admin_url()) as url:
        upgrade(url)
        settings = Settings(home=tmp_path / "home", database_url=url, embedded_worker=False)
        built = build_services(settings)
        yield built
        built.engine.dispose()


@pytest.fixture
def run(
    registry_server: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Result]:
    """`peftreg ARGS` in-process against the module's server, with its own cache and config."""
    for name in ("PEFTREG_URL", "PEFTREG_TOKEN", "PEFTREG_CACHE", "PEFTREG_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "PEFTREG_URL": registry_server.url,
        "PEFTREG_CACHE": str(tmp_path / "cli-cache"),
        "PEFTREG_CONFIG": str(tmp_path / "config.json"),
        "PEFTREG_RETRIES": "1",
    }

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=env)

    return invoke
