from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from peftreg.registry.app import build_services
from peftreg.registry.db.migrate import upgrade
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from tests.fixtures.postgres import fresh_database, postgres_admin_url


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
