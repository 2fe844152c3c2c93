"""Listing and searching repositories and versions, with opaque cursors."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, func, null, select
from sqlalchemy.orm import Session, defer

from peftreg.formats.bounded_json import loads_bounded
from peftreg.registry.auth.scopes import Principal
from peftreg.registry.catalog import tags
from peftreg.registry.catalog.repositories import repository_id_of
from peftreg.registry.db.models import ArtifactIndex, Manifest, Repository, Tag
from peftreg.registry.errors import InvalidRequest

T = TypeVar("T")
ROW_ID_MAX = 2**31 - 1  # row ids are SQL `integer`s


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, kind: type[T]) -> T | None:
    """The position a cursor names, which must be a `kind` (a name, or a row id)."""
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = loads_bounded(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, json.JSONDecodeError):
        raise InvalidRequest(f"invalid cursor {cursor!r}") from None
    in_range = not isinstance(value, int) or 0 <= value <= ROW_ID_MAX
    if not isinstance(value, kind) or isinstance(value, bool) or not in_range:
        raise InvalidRequest(f"invalid cursor {cursor!r}")
    return value


def parse_annotation_filters(raw: list[str]) -> dict[str, str]:
    filters = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"annotation filter {item!r} must look like key=value")
        filters[key] = value
    return filters


@dataclass(frozen=True)
class RepositorySummary:
    name: str
    created_at: str
    immutable_tags: list[str]
    versions: int
    tags: int


def list_repositories(
    session: Session, *, principal: Principal, query: str | None, cursor: str | None, limit: int
) -> Page[RepositorySummary]:
    after = decode_cursor(cursor, str)
    found: list[Repository] = []
    last_seen = after
    while len(found) <= limit:
        statement = select(Repository).order_by(Repository.name).limit(200)
        if last_seen:
            statement = statement.where(Repository.name > last_seen)
        if query:
            statement = statement.where(Repository.name.contains(query, autoescape=True))
        batch = list(session.scalars(statement))
        if not batch:
            break
        found += [repo for repo in batch if principal.can("read", repo.name)]
        last_seen = batch[-1].name
    page, more = found[:limit], len(found) > limit
    ids = [repo.id for repo in page]
    versions = _counts(session, Manifest.repository_id, ids)
    tag_counts = _counts(session, Tag.repository_id, ids)
    items = [
        RepositorySummary(
            name=repo.name,
            created_at=repo.created_at.isoformat(),
            immutable_tags=list(repo.immutable_tags),
            versions=versions.get(repo.id, 0),
            tags=tag_counts.get(repo.id, 0),
        )
        for repo in page
    ]
    return Page(items, encode_cursor(page[-1].name) if more and page else None)


def _counts(session: Session, column: Any, ids: list[int]) -> dict[int, int]:
    statement = select(column, func.count()).where(column.in_(ids)).group_by(column)
    return {key: count for key, count in session.execute(statement).tuples()}


@dataclass(frozen=True)
class ArtifactFilters:
    """Filters on the artifact index; any set one keeps only indexed artifacts."""

    kind: str | None = None
    base_fingerprint: str | None = None
    max_rank: int | None = None
    base_quantization: str | None = None
    verified: bool | None = None

    def active(self) -> bool:
        return any(value is not None for value in vars(self).values())


def list_versions(
    session: Session,
    *,
    principal: Principal,
    repository: str | None,
    artifact_type: str | None,
    annotations: dict[str, str],
    cursor: str | None,
    limit: int,
    filters: ArtifactFilters | None = None,
) -> Page[tuple[Manifest, str, list[str], ArtifactIndex | None]]:
    """Versions (manifests), newest first; each with its repository name, tags and index.

    A keyset page: `id < cursor ORDER BY id DESC LIMIT n`, on the index
    `(repository_id, id)` for one repository and on the primary key across
    all of them, so a page costs the same however many versions there are.
    A version's tags and index row come in the same statement: the tags as a
    correlated aggregate looked up on `(repository_id, manifest_digest)` for
    each row of the page (never a scan of the repository's tags, which a
    planner may prefer for a list of 100 digests), the index row by an outer
    join on its primary key.
    """
    filters = filters or ArtifactFilters()
    after = decode_cursor(cursor, int)
    repository_id, readable = None, False
    if repository is not None:
        repository_id = repository_id_of(session, name=repository)
        readable = principal.can("read", repository)  # one answer for every row
    results: list[tuple[Manifest, str, list[str], ArtifactIndex | None]] = []
    last_id = after
    batch_size = limit + 1
    while len(results) <= limit:
        statement = _page_statement(repository_id, filters).limit(batch_size)
        if last_id is not None:
            statement = statement.where(Manifest.id < int(last_id))
        if artifact_type is not None:
            statement = statement.where(Manifest.artifact_type == artifact_type)
        for key, value in annotations.items():
            statement = statement.where(Manifest.annotations[key].as_string() == value)
        batch = list(session.execute(statement))
        for manifest, tag_list, index, name in batch:
            if repository is not None:  # a repository listing selects no name
                if readable:
                    results.append((manifest, repository, tags.split_names(tag_list), index))
            elif principal.can("read", name):
                results.append((manifest, name, tags.split_names(tag_list), index))
        if len(batch) < batch_size:
            break
        last_id = batch[-1][0].id
        batch_size = max(batch_size, 200)  # the caller may read few of these: larger steps
    page, more = results[:limit], len(results) > limit
    return Page(page, encode_cursor(page[-1][0].id) if more and page else None)


PageSelect = Select[*tuple[Any, ...]]
"""A version, its tags (joined), its index row, its repository's name (across repositories)."""


def _page_statement(repository_id: int | None, filters: ArtifactFilters) -> PageSelect:
    """Versions newest first with their tags, index row and (across repositories) name."""
    tag_list = tags.names_column()
    statement: PageSelect
    if repository_id is not None:
        # One repository: its name is known, and no join may lead the planner off the index.
        statement = select(Manifest, tag_list, ArtifactIndex, null()).where(
            Manifest.repository_id == repository_id
        )
    else:
        statement = select(Manifest, tag_list, ArtifactIndex, Repository.name).join(
            Repository, Repository.id == Manifest.repository_id
        )
    statement = statement.options(defer(Manifest.content))  # listings never need the document
    if filters.active():
        statement = _filter_index(statement, filters)
    else:
        statement = statement.outerjoin(ArtifactIndex, ArtifactIndex.manifest_id == Manifest.id)
    return statement.order_by(Manifest.id.desc())


def _filter_index(statement: PageSelect, filters: ArtifactFilters) -> PageSelect:
    statement = statement.join(ArtifactIndex, ArtifactIndex.manifest_id == Manifest.id)
    if filters.kind is not None:
        statement = statement.where(ArtifactIndex.kind == filters.kind)
    if filters.base_fingerprint is not None:
        statement = statement.where(ArtifactIndex.base_fingerprint == filters.base_fingerprint)
    if filters.max_rank is not None:
        statement = statement.where(ArtifactIndex.max_rank <= filters.max_rank)
    if filters.base_quantization is not None:
        statement = statement.where(ArtifactIndex.base_quantization == filters.base_quantization)
    if filters.verified is not None:
        statement = statement.where(ArtifactIndex.verified == filters.verified)
    return statement
