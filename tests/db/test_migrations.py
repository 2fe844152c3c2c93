from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import UniqueConstraint, create_engine, inspect, pool

from peftreg.registry.db import migrate
from peftreg.registry.db.engine import make_engine
from peftreg.registry.db.models import Base

REPO_ROOT = Path(__file__).resolve().parents[2]


def _diff(url: str) -> list[object]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": False}
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def test_head_is_the_latest_revision() -> None:
    assert migrate.head() == "0006"


def test_upgrade_matches_models(database_url: str) -> None:
    assert migrate.current(database_url) is None
    migrate.upgrade(database_url)
    assert migrate.current(database_url) == migrate.head()
    assert _tables(database_url) == set(Base.metadata.tables) | {"alembic_version"}
    assert _diff(database_url) == []


def test_downgrade_then_upgrade_again(database_url: str) -> None:
    migrate.upgrade(database_url)
    migrate.downgrade(database_url)
    assert _tables(database_url) <= {"alembic_version"}
    assert migrate.current(database_url) is None

    migrate.upgrade(database_url)
    assert migrate.current(database_url) == migrate.head()
    assert _diff(database_url) == []


def test_upgrade_is_idempotent(database_url: str) -> None:
    migrate.upgrade(database_url)
    migrate.upgrade(database_url)
    assert migrate.current(database_url) == migrate.head()


def _expected_names() -> dict[str, dict[str, set[str]]]:
    names: dict[str, dict[str, set[str]]] = {}
    for table in Base.metadata.tables.values():
        names[table.name] = {
            "pk": {str(table.primary_key.name)},
            "fk": {str(fk.name) for fk in table.foreign_key_constraints},
            "uq": {str(c.name) for c in table.constraints if isinstance(c, UniqueConstraint)},
            "ix": {str(ix.name) for ix in table.indexes},
        }
    return names


def _reflected_names(url: str) -> dict[str, dict[str, set[str]]]:
    engine = create_engine(url, poolclass=pool.NullPool)
    names: dict[str, dict[str, set[str]]] = {}
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            for table in Base.metadata.tables:
                names[table] = {
                    "pk": {str(inspector.get_pk_constraint(table)["name"])},
                    "fk": {str(fk["name"]) for fk in inspector.get_foreign_keys(table)},
                    "uq": {str(uq["name"]) for uq in inspector.get_unique_constraints(table)},
                    # PostgreSQL lists each unique constraint's index too.
                    "ix": {
                        str(ix["name"])
                        for ix in inspector.get_indexes(table)
                        if "duplicates_constraint" not in ix
                    },
                }
    finally:
        engine.dispose()
    return names


def test_constraint_and_index_names_follow_the_convention(database_url: str) -> None:
    # Autogenerate compares constraints by their columns, not their names:
    # check the names separately, since later migrations will drop them by name.
    migrate.upgrade(database_url)
    expected = _expected_names()
    assert "None" not in {n for kinds in expected.values() for ns in kinds.values() for n in ns}
    assert _reflected_names(database_url) == expected


def test_upgrade_on_a_given_connection(database_url: str) -> None:
    # The service's own engine: on SQLite it enforces foreign keys, which
    # env.py must switch off around the migration and then restore.
    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(exist_ok=True)
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            config = migrate.alembic_config("unused://")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
            if connection.dialect.name == "sqlite":
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
    assert migrate.current(database_url) == migrate.head()
    assert _diff(database_url) == []


def test_concurrent_upgrades(database_url: str) -> None:
    # Several replicas (or CLI invocations) migrating one database at once:
    # each must succeed, with the schema created exactly once. Alembic's
    # module-level context is not thread-safe, hence processes.
    code = "import sys; from peftreg.registry.db import migrate; migrate.upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, database_url],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    assert migrate.current(database_url) == migrate.head()
    assert _diff(database_url) == []


def test_offline_sql(database_url: str) -> None:
    buffer = io.StringIO()
    config = migrate.alembic_config(database_url)
    config.output_buffer = buffer
    command.upgrade(config, "head", sql=True)
    sql = buffer.getvalue()
    assert "CREATE TABLE repositories" in sql
    assert "CONSTRAINT uq_manifests_repository_id_digest UNIQUE" in sql
    assert migrate.current(database_url) is None  # nothing ran
