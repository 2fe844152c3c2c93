"""`INSERT ... ON CONFLICT DO NOTHING` for both SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from registry.db.models import Base


def insert_ignore(session: Session, model: type[Base], **values: Any) -> bool:
    """Insert a row unless it conflicts with an existing one; returns whether it did."""
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    statement = module.insert(model).values(**values).on_conflict_do_nothing()
    result = session.execute(statement)
    return bool(getattr(result, "rowcount", 0) == 1)
