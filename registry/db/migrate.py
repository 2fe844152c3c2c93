"""Run the Alembic migrations shipped in the `migrations` package.

No alembic.ini is needed on disk: the config is built in memory and points at
the installed package's directory, so this works from a wheel as well as from
a checkout.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

from peftreg import migrations


def script_location() -> Path:
    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    # New revisions: versions/<rev>_<slug>.py, like 0001_initial.py.
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    # The config is a ConfigParser: a literal `%` (URL-escaped passwords) must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for other databases and in-memory ones."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _ensure_sqlite_directory(url: str) -> None:
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def upgrade(url: str, revision: str = "head") -> None:
    _ensure_sqlite_directory(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    _ensure_sqlite_directory(url)
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The database's revision; None when it was never migrated (or is missing)."""
    path = _sqlite_path(url)
    if path is not None and not path.exists():
        return None  # do not create an empty database file just to look
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str | None:
    """The newest revision the shipped migrations know."""
    return ScriptDirectory(str(script_location())).get_current_head()
