"""Tags: immutable release tags and movable channels, with every move recorded."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import ScalarSelect, func, select
from sqlalchemy.orm import Session

from peftreg.names import InvalidName, check_tag
from peftreg.registry.auth.scopes import Principal
from peftreg.registry.catalog import audit
from peftreg.registry.catalog.repositories import is_immutable_tag
from peftreg.registry.db.models import Manifest, Repository, Tag, TagEvent
from peftreg.registry.db.upsert import insert_ignore
from peftreg.registry.errors import ManifestUnknown, TagImmutable, TagInvalid


def valid_tag(tag: str) -> str:
    try:
        return check_tag(tag)
    except InvalidName as exc:
        raise TagInvalid(str(exc), detail={"tag": tag}) from None


def resolve_tag(session: Session, *, repository: Repository, tag: str) -> str:
    digest = session.scalar(
        select(Tag.manifest_digest).where(Tag.repository_id == repository.id, Tag.name == tag)
    )
    if digest is None:
        raise ManifestUnknown(
            f"tag {tag!r} does not exist in {repository.name}", detail={"tag": tag}
        )
    return digest


def set_tag(
    session: Session, *, principal: Principal, repository: Repository, tag: str, digest: str
) -> bool:
    """Point `tag` at `digest`; returns whether anything moved.

    Immutable tags (by the repository's policy) may be created, or re-pushed
    to the digest they already hold, but never moved.
    """
    valid_tag(tag)
    now = datetime.now(UTC)
    created = insert_ignore(
        session,
        Tag,
        repository_id=repository.id,
        name=tag,
        manifest_digest=digest,
        updated_at=now,
    )
    if created:
        _record_move(session, principal, repository, tag, None, digest, now)
        return True
    row = session.scalar(
        select(Tag).where(Tag.repository_id == repository.id, Tag.name == tag).with_for_update()
    )
    assert row is not None
    previous = row.manifest_digest
    if previous == digest:
        return False
    if is_immutable_tag(repository, tag):
        raise TagImmutable(
            f"tag {tag!r} of {repository.name} is immutable and points at {previous}",
            detail={"tag": tag, "current": previous, "rejected": digest},
        )
    row.manifest_digest = digest
    row.updated_at = now
    _record_move(session, principal, repository, tag, previous, digest, now)
    return True


def delete_tag(session: Session, *, principal: Principal, repository: Repository, tag: str) -> None:
    row = session.scalar(
        select(Tag).where(Tag.repository_id == repository.id, Tag.name == tag).with_for_update()
    )
    if row is None:
        raise ManifestUnknown(
            f"tag {tag!r} does not exist in {repository.name}", detail={"tag": tag}
        )
    if is_immutable_tag(repository, tag):
        raise TagImmutable(
            f"tag {tag!r} of {repository.name} is immutable and cannot be deleted",
            detail={"tag": tag, "current": row.manifest_digest},
        )
    now = datetime.now(UTC)
    _record_move(session, principal, repository, tag, row.manifest_digest, None, now)
    session.delete(row)


def untag_digest(
    session: Session, *, principal: Principal, repository: Repository, digest: str
) -> list[str]:
    """Remove every tag pointing at `digest` (forced version deletion)."""
    rows = list(
        session.scalars(
            select(Tag).where(Tag.repository_id == repository.id, Tag.manifest_digest == digest)
        )
    )
    now = datetime.now(UTC)
    for row in rows:
        _record_move(session, principal, repository, row.name, digest, None, now)
        session.delete(row)
    return [row.name for row in rows]


def tags_of(session: Session, *, repository_id: int, digest: str) -> list[str]:
    return list(
        session.scalars(
            select(Tag.name)
            .where(Tag.repository_id == repository_id, Tag.manifest_digest == digest)
            .order_by(Tag.name)
        )
    )


NAME_SEPARATOR = " "
"""Joins a version's tag names in one column: no tag name holds a space."""


def names_column() -> ScalarSelect[str]:
    """The tags of the `Manifest` of each row, joined by `NAME_SEPARATOR` ("" for none).

    A correlated aggregate, looked up on `(repository_id, manifest_digest)` for
    each row the statement returns: never a scan of the repository's tags,
    which a planner may prefer for a list of digests (`split_names` reads it).
    """
    return (
        select(func.coalesce(func.aggregate_strings(Tag.name, NAME_SEPARATOR), ""))
        .where(Tag.repository_id == Manifest.repository_id, Tag.manifest_digest == Manifest.digest)
        .correlate_except(Tag)  # its own `tags`, even where the statement joins tags too
        .scalar_subquery()
    )


def split_names(joined: str) -> list[str]:
    """The names `names_column` joined, in name order."""
    return sorted(joined.split(NAME_SEPARATOR)) if joined else []


def list_tags(
    session: Session, *, repository: Repository, limit: int | None, last: str | None
) -> list[str]:
    query = select(Tag.name).where(Tag.repository_id == repository.id).order_by(Tag.name)
    if last:
        query = query.where(Tag.name > last)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def tag_history(
    session: Session, *, repository: Repository, tag: str | None = None
) -> list[TagEvent]:
    query = select(TagEvent).where(TagEvent.repository_id == repository.id)
    if tag is not None:
        query = query.where(TagEvent.tag == tag)
    return list(session.scalars(query.order_by(TagEvent.id)))


def _record_move(
    session: Session,
    principal: Principal,
    repository: Repository,
    tag: str,
    previous: str | None,
    digest: str | None,
    now: datetime,
) -> None:
    session.add(
        TagEvent(
            repository_id=repository.id,
            tag=tag,
            from_digest=previous,
            to_digest=digest,
            actor=principal.name,
            at=now,
        )
    )
    audit.record(
        session,
        actor=principal.name,
        action="tag.move" if digest else "tag.delete",
        repository=repository.name,
        target=tag,
        detail={"from": previous, "to": digest},
    )


def tag_rows(
    session: Session, *, repository: Repository, limit: int | None = None, after: str | None = None
) -> list[Tag]:
    """The repository's tags by name (`limit` of them after the name `after`)."""
    query = select(Tag).where(Tag.repository_id == repository.id).order_by(Tag.name)
    if after:
        query = query.where(Tag.name > after)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))
