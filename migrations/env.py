"""Alembic environment for the registry's metadata database.

Reads neither settings nor the process environment: the database comes from
the Alembic config, either as a live connection in
`config.attributes["connection"]` or as the `sqlalchemy.url` main option
(see `peftreg.registry.db.migrate.alembic_config`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine, event, pool, text
from sqlalchemy.engine import make_url

from peftreg.registry.db.models import Base

config = context.config
target_metadata = Base.metadata

# Arbitrary constant key of the PostgreSQL advisory lock that serialises
# concurrent upgrades (several replicas migrating at start-up).
_PG_MIGRATION_LOCK = 0x7065667472656701

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=False,
        **kwargs,
    )


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url in the Alembic config")
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=make_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


@contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """Switch SQLite foreign-key enforcement off around the migration.

    Batch operations recreate tables, and with enforcement on, dropping a
    parent table would cascade-delete its children's rows. The pragma is a
    no-op inside a transaction, so it is set on the raw driver connection
    before anything begins.
    """
    raw = connection.connection.driver_connection
    assert raw is not None
    (enabled,) = raw.execute("PRAGMA foreign_keys").fetchone()
    if not enabled:
        yield
        return
    if connection.in_transaction() or raw.in_transaction:
        raise RuntimeError(
            "SQLite migrations need foreign keys off: pass a connection with "
            "PRAGMA foreign_keys=OFF, or one that is not inside a transaction"
        )
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        raw.execute("PRAGMA foreign_keys=ON")


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    # SQLite: the engines given to us issue BEGIN themselves (pysqlite's
    # isolation_level None), so DDL is transactional and the whole upgrade
    # runs in one transaction instead of one per revision.
    _configure(connection=connection, render_as_batch=sqlite, transactional_ddl=sqlite or None)
    if sqlite:
        with _sqlite_foreign_keys_off(connection), context.begin_transaction():
            context.run_migrations()
            violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if violations:
                raise RuntimeError(f"migration left foreign-key violations: {violations[:10]}")
        return
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Held to the end of the migration transaction; taken before
            # Alembic reads the current revision, so a second migrator waits
            # and then finds the work done.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            'pass config.attributes["connection"] or set sqlalchemy.url in the Alembic config'
        )
    if make_url(url).get_backend_name() == "sqlite":
        # Foreign keys stay OFF here (the SQLite default): batch operations
        # recreate tables, and DROP TABLE with enforcement on would cascade.
        engine = create_engine(url, poolclass=pool.NullPool, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite would run DDL outside any transaction; let SQLAlchemy
            # issue BEGIN so a failed migration rolls back as a whole.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            # Take the write lock before Alembic reads the current revision.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    else:
        engine = create_engine(url, poolclass=pool.NullPool)

    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
