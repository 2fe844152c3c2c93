"""Migration 0004 gives existing blobs a whole grace period from the upgrade.

During a rolling upgrade, servers still on 0003 answer HEADs and mounts
without touching blobs: an old unreferenced blob a client was just told
exists must not become collectable the moment the migration runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.orm import Session

from peftreg.registry.app import build_services
from peftreg.registry.db import migrate
from peftreg.registry.db.models import Blob
from peftreg.registry.maintenance.gc import collect_garbage
from peftreg.registry.settings import Settings
from tests.fixtures.postgres import fresh_database, postgres_admin_url

OLD_DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'home' / 'peftreg.db'}"
    else:
        with fresh_database(postgres_admin_url()) as url:
            yield url


def test_existing_blobs_count_as_touched_at_the_upgrade(database_url: str, tmp_path: Path) -> None:
    migrate.upgrade(database_url, "0003")
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO blobs (digest, size, created_at) VALUES (:digest, 5, :created)"),
                {"digest": OLD_DIGEST, "created": datetime(2020, 1, 1, tzinfo=UTC)},
            )
        upgraded_from = datetime.now(UTC).replace(microsecond=0)
        migrate.upgrade(database_url, "0004")
        with Session(engine) as session:
            row = session.get(Blob, OLD_DIGEST)
            assert row is not None
            assert row.created_at.year == 2020
            assert row.touched_at >= upgraded_from
    finally:
        engine.dispose()

    services = build_services(
        Settings(home=tmp_path / "home", database_url=database_url, embedded_worker=False)
    )
    try:
        report = collect_garbage(services, dry_run=True, grace=timedelta(hours=1))
        assert report.removed == []
    finally:
        services.engine.dispose()
