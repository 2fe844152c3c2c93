from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.postgres import fresh_database, postgres_admin_url


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        # A directory that does not exist yet: migrate.upgrade must create it.
        yield f"sqlite:///{tmp_path / 'state' / 'peftreg.db'}"
    else:
        with fresh_database(postgres_admin_url()) as url:
            yield url
