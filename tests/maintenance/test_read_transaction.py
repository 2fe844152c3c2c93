"""`Services.read_transaction`: scans that never hold up a push.

On SQLite every ordinary transaction is `BEGIN IMMEDIATE` (the single write
lock); a read transaction is a plain `BEGIN` that reads a snapshot and lets
writers commit meanwhile. On PostgreSQL it is `REPEATABLE READ READ ONLY`,
and the pooled connection is an ordinary read-write one again afterwards.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError

from peftreg.registry.app import build_services
from peftreg.registry.db.models import Blob
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from tests.fixtures.postgres import fresh_database, postgres_admin_url


@pytest.fixture
def sqlite_services(tmp_path: Path) -> Iterator[Services]:
    services = build_services(Settings(home=tmp_path / "home", embedded_worker=False))
    yield services
    services.engine.dispose()


def blob_count(services: Services) -> int:
    with services.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Blob)) or 0)


def test_sqlite_read_transaction_lets_a_writer_commit(
    sqlite_services: Services, tmp_path: Path
) -> None:
    with sqlite_services.read_transaction() as session:
        assert session.scalar(select(func.count()).select_from(Blob)) == 0
        # Another process's push: it takes the write lock at once (no 30 s busy
        # wait here) because the read transaction holds none.
        writer = sqlite3.connect(tmp_path / "home" / "peftreg.db", timeout=0.2)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO blobs (digest, size) VALUES ('sha256:' || hex(1), 1)")
            writer.execute("COMMIT")
        finally:
            writer.close()
        # One snapshot to the end of the transaction.
        assert session.scalar(select(func.count()).select_from(Blob)) == 0
    assert blob_count(sqlite_services) == 1
    # An ordinary transaction still takes the write lock up front.
    with sqlite_services.transaction() as session:
        session.execute(text("SELECT 1"))  # the transaction begins with its first statement
        blocked = sqlite3.connect(tmp_path / "home" / "peftreg.db", timeout=0.05)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                blocked.execute("BEGIN IMMEDIATE")
        finally:
            blocked.close()


@pytest.mark.postgres
def test_postgres_read_transaction_is_a_read_only_snapshot(tmp_path: Path) -> None:
    with fresh_database(postgres_admin_url()) as url:
        services = build_services(
            Settings(home=tmp_path / "home", database_url=url, auto_migrate=True)
        )
        try:
            with services.read_transaction() as session:
                assert session.scalar(text("SHOW transaction_isolation")) == "repeatable read"
                assert session.scalar(text("SHOW transaction_read_only")) == "on"
                assert session.scalar(select(func.count()).select_from(Blob)) == 0
                with services.transaction() as other:
                    other.execute(insert(Blob).values(digest="sha256:1", size=1))
                assert session.scalar(select(func.count()).select_from(Blob)) == 0
            with (
                pytest.raises(DBAPIError, match="read-only transaction"),
                services.read_transaction() as session,
            ):
                session.execute(insert(Blob).values(digest="sha256:2", size=1))
            # The pool hands out ordinary connections again.
            for _ in range(3):
                with services.transaction() as session:
                    assert session.scalar(text("SHOW transaction_isolation")) == "read committed"
                    assert session.scalar(text("SHOW transaction_read_only")) == "off"
            assert blob_count(services) == 1
        finally:
            services.engine.dispose()
