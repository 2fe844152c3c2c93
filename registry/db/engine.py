"""Engine and session factory built from settings (never at import time)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import Session, sessionmaker

SQLITE_MMAP_BYTES = 1 << 30  # address space, not memory: pages are the OS page cache's
READ_ONLY_OPTION = "peftreg_read_only"
"""Execution option marking an engine's connections for read-only transactions."""
PING_AFTER_IDLE_SECONDS = 1.0
"""A pooled server connection idle this long is checked before use (`ping_after_idle`)."""


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": 30},
            # As many as the request threads (anyio's 40): a connection per request
            # over the default 5 + 10 would be opened, set up (PRAGMAs) and closed.
            pool_size=40,
            max_overflow=10,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy issue BEGIN itself (the pysqlite default defers it),
            # so `BEGIN IMMEDIATE` below takes the write lock up front.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # Reads from a memory map of the database file (the OS page cache, shared by
            # every connection), not through each connection's 2 MB page cache: a
            # catalog larger than that is read without a system call per page.
            cursor.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # Read-only work takes a plain (deferred) BEGIN: in WAL mode it reads
            # a snapshot and neither waits for nor blocks the single writer.
            read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        report_unreachable(engine)
        return engine
    engine = create_engine(url, echo=echo, pool_size=10, max_overflow=20)
    ping_after_idle(engine, PING_AFTER_IDLE_SECONDS)
    report_unreachable(engine)
    return engine


class DatabaseUnreachable(exc.OperationalError):
    """No connection to the database could be opened: it is down, restarting or full.

    Raised in place of the driver's `OperationalError` when connecting fails
    (not for a statement that fails on an open connection), so the API can
    answer "try again" rather than "internal error". Still an
    `OperationalError`: code that handles database errors broadly is unchanged.
    """


def report_unreachable(engine: Engine) -> None:
    """Raise `DatabaseUnreachable` for a failure to open a connection."""

    @event.listens_for(engine, "handle_error")
    def _unreachable(context: ExceptionContext) -> BaseException | None:
        error = context.sqlalchemy_exception
        # No `Connection` yet: the failure happened while connecting.
        if context.connection is not None or not isinstance(error, exc.OperationalError):
            return None
        if isinstance(error, DatabaseUnreachable) or error.orig is None:
            return None
        return DatabaseUnreachable(error.statement, error.params, error.orig)


def ping_after_idle(engine: Engine, idle_seconds: float) -> None:
    """Check a pooled connection before use when it sat in the pool `idle_seconds` or more.

    `pool_pre_ping` checks every checkout: a round trip on each request, a
    fifth of a version listing's on PostgreSQL. A connection back in the pool
    for less than `idle_seconds` served a request that recently, so it is used
    as it is; one idle longer (when a firewall, a connection pooler or a server
    restart may have dropped it) is pinged, and replaced if dead. A connection
    that dies in between fails its first statement: SQLAlchemy then replaces
    every connection of the pool, and `in_read_statements` retries the read.
    """

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("returned_at")  # none: connected for this checkout
        if returned is None or time.monotonic() - returned < idle_seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            # The pool discards this connection and checks out another (up to 3 tries).
            raise exc.DisconnectionError(f"pooled connection is gone: {error}") from error


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def read_only_engine(engine: Engine) -> Engine:
    """`engine` for read-only transactions: one snapshot, taking no write lock.

    SQLite: a deferred `BEGIN` instead of `BEGIN IMMEDIATE` (see `make_engine`).
    PostgreSQL: `REPEATABLE READ READ ONLY`, so a scan made of several
    statements sees one snapshot, and a write by mistake fails. Same pool;
    the options apply to each transaction begun through the returned engine.
    """
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{READ_ONLY_OPTION: True})
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return engine


def statement_engine(engine: Engine) -> Engine:
    """`engine` for reads whose statements each stand alone (a lookup, a keyset page).

    PostgreSQL: autocommit, so each statement reads its own snapshot, without
    the BEGIN and COMMIT round trips of a transaction (two of a listing's five).
    SQLite: `read_only_engine`'s transaction, which costs no round trip.
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return read_only_engine(engine)
