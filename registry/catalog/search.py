"""Listing and searching repositories and versions, with opaque cursors."""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import BindParameter, Select, bindparam, func, null, select
from sqlalchemy.orm import Session

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
    """Filters on the artifact index; any set one keeps only indexed artifacts.

    Each field is named after the `ArtifactIndex` column it compares with
    (`_filter_index` binds them by name); `max_rank` is an upper bound.
    """

    kind: str | None = None
    base_fingerprint: str | None = None
    max_rank: int | None = None
    base_quantization: str | None = None
    verified: bool | None = None


@dataclass(frozen=True, slots=True)
class ListedVersion:
    """A version's manifest columns as a listing reads them: never its document."""

    id: int
    repository_id: int
    digest: str
    media_type: str
    artifact_type: str | None
    subject_digest: str | None
    annotations: dict[str, str]
    size: int
    pushed_by: str | None
    created_at: datetime

    @classmethod
    def of(cls, manifest: Manifest) -> ListedVersion:
        return cls(*(getattr(manifest, name) for name in _FIELDS_OF[cls]))


@dataclass(frozen=True, slots=True)
class IndexSummary:
    """What validation indexed of an adapter or base, as a listing reads it."""

    kind: str
    max_rank: int | None
    base_fingerprint: str | None
    base_quantization: str | None
    verified: bool
    fingerprint: str | None


_FIELDS_OF = {kind: tuple(f.name for f in fields(kind)) for kind in (ListedVersion, IndexSummary)}
_VERSION_WIDTH = len(_FIELDS_OF[ListedVersion])
_INDEX_WIDTH = len(_FIELDS_OF[IndexSummary])

VersionItem = tuple[ListedVersion, str, list[str], IndexSummary | None]
"""A version, its repository's name, its tags (in name order), its index row if any."""


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
) -> Page[VersionItem]:
    """Versions (manifests), newest first; each with its repository name, tags and index.

    A keyset page: `id < cursor ORDER BY id DESC LIMIT n`, on the index
    `(repository_id, id)` for one repository and on the primary key across
    all of them, so a page costs the same however many versions there are.
    A version's tags and index row come in the same statement: the tags as a
    correlated aggregate looked up on `(repository_id, manifest_digest)` for
    each row of the page (never a scan of the repository's tags, which a
    planner may prefer for a list of 100 digests), the index row by an outer
    join on its primary key. Rows are read as columns, not ORM objects, and
    the statement for each shape of query is built once (`_page_statement`).
    """
    filters = filters or ArtifactFilters()
    after = decode_cursor(cursor, int)
    set_filters = {name: value for name, value in vars(filters).items() if value is not None}
    keys = tuple(annotations)
    values: dict[str, Any] = {
        **set_filters,
        **{f"annotation_{n}": annotations[key] for n, key in enumerate(keys)},
        "artifact_type": artifact_type,
    }
    if repository is not None:
        values["repository_id"] = repository_id_of(session, name=repository)
        if not principal.can("read", repository):  # one answer for every row
            return Page([], None)
    shape = _Shape(repository is not None, tuple(set_filters), artifact_type is not None, keys)
    results: list[VersionItem] = []
    last_id = after
    batch_size = limit + 1
    while len(results) <= limit:
        statement = _page_statement(shape, after=last_id is not None)
        batch = session.execute(statement, {**values, "after": last_id, "limit": batch_size}).all()
        for row in batch:
            if repository is not None:
                results.append(_version_item(row, repository))
            elif principal.can("read", row[-1]):  # across repositories: the last column
                results.append(_version_item(row, row[-1]))
        if len(batch) < batch_size:
            break
        last_id = batch[-1][0]  # the version's id, its first column
        batch_size = max(batch_size, 200)  # the caller may read few of these: larger steps
    page, more = results[:limit], len(results) > limit
    return Page(page, encode_cursor(page[-1][0].id) if more and page else None)


def _version_item(row: Any, name: str) -> VersionItem:
    """A row of `_page_statement`: the version's columns, its tags, the index's, the name."""
    version = ListedVersion(*row[:_VERSION_WIDTH])
    index_columns = row[_VERSION_WIDTH + 1 : _VERSION_WIDTH + 1 + _INDEX_WIDTH]
    index = IndexSummary(*index_columns) if index_columns[0] is not None else None
    return version, name, tags.split_names(row[_VERSION_WIDTH]), index


@dataclass(frozen=True)
class _Shape:
    """What a page's statement is made of; the values it compares with are bound."""

    one_repository: bool
    filters: tuple[str, ...]
    """The `ArtifactFilters` fields set."""
    artifact_type: bool
    annotation_keys: tuple[str, ...]


PageSelect = Select[*tuple[Any, ...]]
"""The columns of a version, its tags (joined), its index row's, its repository's name."""


@functools.lru_cache(maxsize=256)
def _page_statement(shape: _Shape, *, after: bool) -> PageSelect:
    """Versions newest first with their tags, index row and (across repositories) name.

    Bound parameters: `limit`, `after` (with `after=True`), `repository_id`
    (one repository), `artifact_type`, each set filter by its field name, and
    `annotation_<n>` for the n-th annotation key. Built once per shape: the
    building, not the query, was a fifth of a listing's server time.
    """
    columns = (
        *(getattr(Manifest, name) for name in _FIELDS_OF[ListedVersion]),
        tags.names_column(),
        *(getattr(ArtifactIndex, name) for name in _FIELDS_OF[IndexSummary]),
    )
    statement: PageSelect
    if shape.one_repository:
        # One repository: its name is known, and no join may lead the planner off the index.
        statement = select(*columns, null()).where(
            Manifest.repository_id == bindparam("repository_id")
        )
    else:
        statement = select(*columns, Repository.name).join(
            Repository, Repository.id == Manifest.repository_id
        )
    if shape.filters:
        statement = _filter_index(statement, shape.filters)
    else:
        statement = statement.outerjoin(ArtifactIndex, ArtifactIndex.manifest_id == Manifest.id)
    if after:
        statement = statement.where(Manifest.id < bindparam("after"))
    if shape.artifact_type:
        statement = statement.where(Manifest.artifact_type == bindparam("artifact_type"))
    for n, key in enumerate(shape.annotation_keys):
        statement = statement.where(
            Manifest.annotations[key].as_string() == bindparam(f"annotation_{n}")
        )
    return statement.order_by(Manifest.id.desc()).limit(bindparam("limit"))


def _filter_index(statement: PageSelect, filters: tuple[str, ...]) -> PageSelect:
    """Only indexed versions, with each of these `ArtifactFilters` fields bound by its name."""
    statement = statement.join(ArtifactIndex, ArtifactIndex.manifest_id == Manifest.id)
    for name in filters:
        column = getattr(ArtifactIndex, name)
        value: BindParameter[Any] = bindparam(name)
        statement = statement.where(column <= value if name == "max_rank" else column == value)
    return statement
