"""What one running service holds: settings, database, blob store."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from anyio import CapacityLimiter
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from peftreg.registry.db.engine import read_only_engine, statement_engine
from peftreg.registry.observability.metrics import Metrics
from peftreg.registry.settings import Settings
from peftreg.registry.storage.base import BlobStore


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: BlobStore
    metrics: Metrics = field(default_factory=Metrics)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back on error."""
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def read_transaction(self) -> Iterator[Session]:
        """A read-only unit of work over one snapshot, taking no write lock.

        For scans that must not hold up pushes (fsck, GC's listings, metrics
        scrapes): on SQLite a plain `BEGIN` (readers never wait for or block
        the single writer), on PostgreSQL `REPEATABLE READ READ ONLY`. Never
        write in it: PostgreSQL refuses, and SQLite would take the write lock
        halfway through.
        """
        with self._read_sessions.begin() as session:
            yield session

    @contextmanager
    def read_statements(self) -> Iterator[Session]:
        """Read-only work whose statements each stand alone: no snapshot across them.

        For a request's lookups and keyset pages, which read the same whether
        or not a write lands between two statements. On PostgreSQL outside a
        transaction (see `statement_engine`). Never write in it.
        """
        with self._statement_sessions.begin() as session:
            yield session

    @cached_property
    def read_threads(self) -> CapacityLimiter:
        """How many requests' read transactions run at once in this process."""
        return CapacityLimiter(self.settings.resolved_db_read_threads())

    @cached_property
    def token_key(self) -> bytes:
        """The HMAC key signing registry tokens (see `Settings.token_signing_key`)."""
        configured = self.settings.token_signing_key
        if configured is not None:
            return configured.get_secret_value().encode()
        return secrets.token_bytes(32)

    @cached_property
    def _read_sessions(self) -> sessionmaker[Session]:
        return sessionmaker(read_only_engine(self.engine), expire_on_commit=False)

    @cached_property
    def _statement_sessions(self) -> sessionmaker[Session]:
        return sessionmaker(statement_engine(self.engine), expire_on_commit=False)
