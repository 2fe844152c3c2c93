"""`INSERT ... ON CONFLICT DO NOTHING` for both SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from peftreg.registry.db.models import Base


def insert_ignore(session: Session, model: type[Base], **values: Any) -> bool:
    """Insert a row unless it conflicts with an existing one; returns whether it did."""
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    key = list(inspect(model).primary_key)
    statement = module.insert(model).values(**values).on_conflict_do_nothing().returning(*key)
    # RETURNING, not rowcount: the driver reports -1 for some inserts on PostgreSQL.
    return session.execute(statement).first() is not None
