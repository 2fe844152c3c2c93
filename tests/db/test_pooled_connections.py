"""Pooled PostgreSQL connections: few round trips per request, and none of them stale.

A request's reads take no BEGIN and COMMIT (`Services.read_statements`), a
connection that served a request a moment ago is used without a ping, and a
connection the server dropped is replaced: by a ping after it sat idle, or
by the one retry of a read (`in_read_statements`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import create_engine, func, insert, make_url, select, text
from sqlalchemy.orm import Session

from peftreg.registry.api.deps import in_read_statements
from peftreg.registry.app import build_services, create_app
from peftreg.registry.db.engine import make_session_factory, ping_after_idle
from peftreg.registry.db.models import Blob, UploadSession
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from tests.fixtures.postgres import fresh_database, postgres_admin_url
from tests.fixtures.server import start_registry

pytestmark = pytest.mark.postgres


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    with fresh_database(postgres_admin_url()) as url:
        built = build_services(
            Settings(home=tmp_path / "home", database_url=url, auto_migrate=True)
        )
        try:
            yield built
        finally:
            built.engine.dispose()


def _backend_pid(session: Session) -> int:
    return int(session.scalar(text("SELECT pg_backend_pid()")) or 0)


def _drop(pid: int) -> None:
    """What a server restart or an idle timeout does to a pooled connection."""
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            # Waits (up to 10 s) until the backend has exited.
            assert connection.scalar(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
    finally:
        admin.dispose()


def test_read_statements_take_no_transaction_and_leave_the_pool_transactional(
    services: Services,
) -> None:
    with services.read_statements() as session:
        assert session.scalar(select(func.count()).select_from(Blob)) == 0
        with services.transaction() as other:
            other.execute(insert(Blob).values(digest="sha256:1", size=1))
        # No snapshot across statements: each sees what committed before it.
        assert session.scalar(select(func.count()).select_from(Blob)) == 1
        assert session.scalar(text("SELECT now() = statement_timestamp()"))

    # The connection goes back to the pool as an ordinary transactional one.
    def failed_push() -> None:
        with services.transaction() as session:
            session.execute(insert(Blob).values(digest="sha256:2", size=1))
            raise RuntimeError("the push failed")

    for _ in range(3):
        with pytest.raises(RuntimeError):
            failed_push()
    with services.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Blob)) == 1


@pytest.mark.parametrize(("idle_seconds", "pinged"), [(3600.0, False), (0.0, True)])
def test_a_connection_is_pinged_only_after_sitting_idle(
    services: Services, idle_seconds: float, pinged: bool
) -> None:
    engine = create_engine(services.engine.url)
    ping_after_idle(engine, idle_seconds)
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    last_query = text("SELECT query FROM pg_stat_activity WHERE pid = :pid")
    try:
        with engine.connect() as connection:
            pid = int(connection.scalar(text("SELECT pg_backend_pid()")) or 0)
        with engine.connect() as connection, admin.connect() as watcher:
            # The backend's last statement: the ping's, or the ROLLBACK that
            # ended the first checkout.
            ran = watcher.scalar(last_query, {"pid": pid})
            assert int(connection.scalar(text("SELECT pg_backend_pid()")) or 0) == pid
        assert (ran != "ROLLBACK") == pinged, ran
    finally:
        engine.dispose()
        admin.dispose()


def test_a_dropped_connection_idle_past_the_threshold_is_replaced_by_its_ping(
    services: Services,
) -> None:
    engine = create_engine(services.engine.url)
    ping_after_idle(engine, 0.0)  # every reuse counts as idle: always pinged
    try:
        with engine.connect() as connection:
            dropped = int(connection.scalar(text("SELECT pg_backend_pid()")) or 0)
        _drop(dropped)
        with engine.connect() as connection:  # no error: the ping found it dead
            assert connection.scalar(text("SELECT pg_backend_pid()")) != dropped
    finally:
        engine.dispose()


def test_a_read_on_a_connection_dropped_since_its_last_request_is_retried_once(
    services: Services,
) -> None:
    engine = create_engine(services.engine.url)
    ping_after_idle(engine, 3600.0)  # never idle long enough: never pinged
    quiet = replace(services, engine=engine, sessions=make_session_factory(engine))
    try:
        with quiet.read_statements() as session:
            dropped = _backend_pid(session)
        _drop(dropped)

        pids = anyio.run(in_read_statements, quiet, _backend_pid)
        assert pids != dropped
        # A write is not repeated behind the caller's back: the request gets a 503
        # that clients retry, and the pool has replaced its connections for it.
        with quiet.read_statements() as session:
            dropped = _backend_pid(session)
        _drop(dropped)
        app = create_app(quiet.settings, quiet)

        async def start_uploads() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
                return [await http.post("/v2/acme/bot/blobs/uploads/") for _ in range(2)]

        failed, sent_again = anyio.run(start_uploads)
        assert failed.status_code == 503, failed.text
        assert failed.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert failed.headers["Retry-After"] == "1"
        assert sent_again.status_code == 202, sent_again.text
        # Nothing of the failed request was committed: one upload session, the second's.
        with quiet.transaction() as session:
            assert session.scalar(select(func.count()).select_from(UploadSession)) == 1
    finally:
        engine.dispose()


def _allow_connections(database: str, allowed: bool) -> None:
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(
                text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            )
            if not allowed:  # and close the ones open, as a restart would
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                        "WHERE datname = :name"
                    ),
                    {"name": database},
                )
    finally:
        admin.dispose()


def test_a_database_that_refuses_connections_answers_503_until_it_is_back(
    tmp_path: Path,
) -> None:
    with fresh_database(postgres_admin_url()) as url:
        database = make_url(url).database
        assert database is not None
        server = start_registry(
            tmp_path / "home", {"PEFTREG_DATABASE_URL": url, "PEFTREG_AUTO_MIGRATE": "true"}
        )
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                assert http.post("/v2/acme/bot/blobs/uploads/").status_code == 202
                _allow_connections(database, False)
                try:
                    # The pooled connection was dropped too: the first request may find that
                    # out (503 "connection lost"), and from then on each one fails to connect.
                    first = http.post("/v2/acme/bot/blobs/uploads/")
                    assert first.status_code == 503, first.text
                    for method, path in (
                        ("POST", "/v2/acme/bot/blobs/uploads/"),  # a write
                        ("GET", "/v2/acme/bot/tags/list"),  # a read, retried once inside
                        ("GET", "/api/v1/repositories"),
                    ):
                        refused = http.request(method, path)
                        assert refused.status_code == 503, (method, path, refused.text)
                        error = refused.json()["errors"][0]
                        assert error["code"] == "UNAVAILABLE"
                        assert error["message"] == "database unavailable; retry the request"
                        assert "127.0.0.1" not in refused.text  # the cause is logged, not sent
                        assert refused.headers["Retry-After"] == "1"
                    assert http.get("/readyz").status_code == 503
                finally:
                    _allow_connections(database, True)
                assert http.post("/v2/acme/bot/blobs/uploads/").status_code == 202
                assert http.get("/v2/acme/bot/tags/list").status_code == 200
        finally:
            server.stop()
        assert "database unreachable" in server.log_path.read_text()


def test_a_request_that_finds_no_free_connection_answers_503(services: Services) -> None:
    engine = create_engine(services.engine.url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    full = replace(services, engine=engine, sessions=make_session_factory(engine))
    app = create_app(full.settings, full)

    async def list_tags() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            return await http.get("/v2/acme/bot/tags/list")

    try:
        with engine.connect():  # the pool's only connection, held
            busy = anyio.run(list_tags)
        assert busy.status_code == 503, busy.text
        assert busy.json()["errors"][0]["message"].startswith("server busy")
        assert busy.headers["Retry-After"] == "1"
        assert anyio.run(list_tags).status_code == 404  # a free connection: answered
    finally:
        engine.dispose()
