"""The audit log: one row per write, in the same transaction as the write."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.registry.context import current_request_id
from peftreg.registry.db.models import AuditEvent


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    repository: str | None = None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEvent(
            at=datetime.now(UTC),
            actor=actor,
            action=action,
            repository=repository,
            target=target,
            detail=detail or {},
            request_id=current_request_id(),
        )
    )


def recent(
    session: Session, *, repository: str | None = None, limit: int = 100
) -> list[AuditEvent]:
    """The newest audit events first (of one repository when named)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if repository is not None:
        query = query.where(AuditEvent.repository == repository)
    return list(session.scalars(query))
