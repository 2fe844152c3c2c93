"""Version listings: keyset pages on an index, a fixed number of queries per page."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, insert, text
from sqlalchemy.orm import Session

from peftreg.digest import Digest
from peftreg.registry.auth.scopes import anonymous_principal
from peftreg.registry.catalog import manifests, search, tags
from peftreg.registry.db import migrate
from peftreg.registry.db.engine import make_engine
from peftreg.registry.db.models import Manifest, Repository, Tag
from peftreg.registry.errors import DigestInvalid, ManifestUnknown, NameUnknown, TagInvalid
from tests.fixtures.postgres import fresh_database, postgres_admin_url

READER = anonymous_principal("read")
VERSIONS = 60


@dataclass
class Catalog:
    engine: Engine
    repository_id: int
    small_repository_id: int  # 5 versions of the 65: where an index beats a scan


def _add_versions(session: Session, repository_id: int, first: int, count: int) -> None:
    for number in range(first, first + count):
        digest = str(Digest.of_bytes(f"manifest {repository_id} {number}".encode()))
        session.add(
            Manifest(
                repository_id=repository_id,
                digest=digest,
                media_type="application/vnd.oci.image.manifest.v1+json",
                artifact_type="application/vnd.example.v1",
                annotations={},
                size=2,
                content=b"{}",
            )
        )
        # Every version tagged v<n>; every third also `latest-<n>`, to check the order.
        session.add(Tag(repository_id=repository_id, name=f"v{number}", manifest_digest=digest))
        if number % 3 == 0:
            session.add(
                Tag(repository_id=repository_id, name=f"a-{number}", manifest_digest=digest)
            )


def _two_repositories(session: Session) -> tuple[Repository, Repository]:
    """`acme/bot` (empty) and `acme/other` with 5 versions."""
    ours = Repository(name="acme/bot", immutable_tags=[])
    other = Repository(name="acme/other", immutable_tags=[])
    session.add_all([ours, other])
    session.flush()
    _add_versions(session, other.id, 0, 5)
    return ours, other


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def catalog(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Catalog]:
    with _database(request.param, tmp_path_factory.mktemp("listing")) as url:
        migrate.upgrade(url)
        engine = make_engine(url)
        with Session(engine) as session, session.begin():
            ours, other = _two_repositories(session)
            _add_versions(session, ours.id, 0, VERSIONS)
            repository_id, small = ours.id, other.id
        if engine.dialect.name == "postgresql":
            # What autovacuum does to a table of that size soon enough: statistics.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("ANALYZE"))
        yield Catalog(engine, repository_id, small)
        engine.dispose()


@contextmanager
def _database(backend: str, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'peftreg.db'}"
        return
    with fresh_database(postgres_admin_url()) as url:
        yield url


def _page(
    session: Session, cursor: str | None, limit: int, repository: str = "acme/bot"
) -> search.Page[Any]:
    return search.list_versions(
        session,
        principal=READER,
        repository=repository,
        artifact_type=None,
        annotations={},
        cursor=cursor,
        limit=limit,
    )


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement the engine sends while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_page_costs_the_same_queries_whatever_its_size(catalog: Catalog) -> None:
    counts = {}
    for limit in (5, 50):
        with _statements(catalog.engine) as seen, Session(catalog.engine) as session:
            page = _page(session, None, limit)
        assert len(page.items) == limit
        counts[limit] = len(seen)
    # The repository, then one statement for the versions with their tags and index rows.
    assert counts[5] == counts[50] <= 3, counts


def test_a_statement_built_once_serves_each_listing_its_own_values(catalog: Catalog) -> None:
    """The page statement is built once per shape: repository, cursor and limit are bound."""
    with Session(catalog.engine) as session:
        ours = _page(session, None, 4)
        other = _page(session, None, 10, repository="acme/other")
        ours_next = _page(session, ours.next_cursor, 2)
        other_again = _page(session, None, 2, repository="acme/other")
    assert {item[0].repository_id for item in ours.items} == {catalog.repository_id}
    assert [item[1] for item in other.items] == ["acme/other"] * 5
    assert {item[0].repository_id for item in other.items} == {catalog.small_repository_id}
    assert other.next_cursor is None
    assert len(ours_next.items) == 2
    assert max(item[0].id for item in ours_next.items) < min(item[0].id for item in ours.items)
    assert {item[0].repository_id for item in ours_next.items} == {catalog.repository_id}
    assert [item[0].id for item in other_again.items] == [item[0].id for item in other.items[:2]]


def test_cursors_are_stable_across_inserts(catalog: Catalog) -> None:
    with Session(catalog.engine) as session:
        first = _page(session, None, 10)
    with Session(catalog.engine) as session, session.begin():
        _add_versions(session, catalog.repository_id, 1000, 3)  # newer than every page
    try:
        walked = [item[0].digest for item in first.items]
        cursor = first.next_cursor
        while cursor is not None:
            with Session(catalog.engine) as session:
                page = _page(session, cursor, 10)
            walked += [item[0].digest for item in page.items]
            cursor = page.next_cursor
        assert len(walked) == len(set(walked)) == VERSIONS
        with Session(catalog.engine) as session:
            newest = _page(session, None, 3)
        assert not {item[0].digest for item in newest.items} & set(walked)
    finally:
        with Session(catalog.engine) as session, session.begin():
            for manifest in (
                session.query(Manifest)
                .filter(Manifest.repository_id == catalog.repository_id)
                .order_by(Manifest.id.desc())
                .limit(3)
            ):
                session.query(Tag).filter(Tag.manifest_digest == manifest.digest).delete()
                session.delete(manifest)


def test_each_version_carries_its_own_tags_in_name_order(catalog: Catalog) -> None:
    with Session(catalog.engine) as session:
        page = _page(session, None, VERSIONS)
        for manifest, name, tag_names, _index in page.items:
            assert name == "acme/bot"
            assert tag_names == tags.tags_of(
                session, repository_id=manifest.repository_id, digest=manifest.digest
            )
            assert tag_names
            assert tag_names == sorted(tag_names)


def test_listing_and_tag_lookups_use_their_indexes(catalog: Catalog) -> None:
    with catalog.engine.connect() as connection:
        if catalog.engine.dialect.name == "sqlite":
            explain = "EXPLAIN QUERY PLAN "
        else:
            # Tables this small are cheaper to scan and sort: ask whether an index serves it.
            for method in ("seqscan", "bitmapscan", "sort"):
                connection.execute(text(f"SET enable_{method} = off"))
            explain = "EXPLAIN "
        listing = connection.execute(
            text(
                explain + "SELECT id FROM manifests WHERE repository_id = :r AND id < :c "
                "ORDER BY id DESC LIMIT 100"
            ),
            {"r": catalog.small_repository_id, "c": 10**9},
        )
        plan = " ".join(str(row[-1]) for row in listing)
        # SQLite may take the single-column index: it ends in the rowid, the same order.
        assert "ix_manifests_repository_" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
        assert "Sort" not in plan, plan
        lookup = connection.execute(
            text(
                explain + "SELECT name FROM tags WHERE repository_id = :r "
                "AND manifest_digest = :d ORDER BY name"
            ),
            {"r": catalog.repository_id, "d": "sha256:" + "0" * 64},
        )
        plan = " ".join(str(row[-1]) for row in lookup)
        assert "ix_tags_repository_digest_name" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
        assert "Sort" not in plan, plan


LARGE = 5000  # versions: where a planner would rather scan the tags than look up 100 digests


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def large_catalog(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """One repository of `LARGE` tagged versions beside a small one, with statistics."""
    with _database(request.param, tmp_path_factory.mktemp("large")) as url:
        migrate.upgrade(url)
        engine = make_engine(url)
        with Session(engine) as session, session.begin():
            ours, _other = _two_repositories(session)
            digests = [str(Digest.of_bytes(f"large {n}".encode())) for n in range(LARGE)]
            common = {"media_type": "application/vnd.oci.image.manifest.v1+json", "size": 2}
            session.execute(
                insert(Manifest),
                [
                    {**common, "repository_id": ours.id, "digest": d, "annotations": {}}
                    | {"content": b"{}"}
                    for d in digests
                ],
            )
            session.execute(
                insert(Tag),
                [
                    {"repository_id": ours.id, "name": f"v{n}", "manifest_digest": d}
                    for n, d in enumerate(digests)
                ],
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE"))
        yield engine
        engine.dispose()


def _plans(engine: Engine, repository: str, cursor: str | None, size: int) -> list[str]:
    """The plan of each statement a listing page sends, with the parameters it sent."""
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with Session(engine) as session:
            page = _page(session, cursor, 100, repository)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(page.items) == size
    assert all(tag_names for _m, _n, tag_names, _i in page.items)
    sqlite = engine.dialect.name == "sqlite"
    plans = []
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        for statement, parameters in sent:
            dbapi_cursor = raw.cursor()
            dbapi_cursor.execute(
                ("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement, parameters
            )
            plans.append(" | ".join(str(row[-1]) for row in dbapi_cursor.fetchall()))
            dbapi_cursor.close()
    return plans


@pytest.mark.parametrize(
    ("repository", "position", "size"),
    [("acme/bot", "first page", 100), ("acme/bot", "middle", 100), ("acme/other", "first page", 5)],
)
def test_a_page_reads_indexes_only_beside_a_large_repository(
    large_catalog: Engine, repository: str, position: str, size: int
) -> None:
    """With the planner's own choices: no scan of the tags or versions, no sort."""
    cursor = None
    if position == "middle":
        with Session(large_catalog) as session:
            middle = session.scalar(
                text("SELECT id FROM manifests ORDER BY id LIMIT 1 OFFSET :n"), {"n": LARGE // 2}
            )
        cursor = search.encode_cursor(middle)
    plans = _plans(large_catalog, repository, cursor, size)
    assert len(plans) == 2, plans  # the repository; the page with its tags and index rows
    page_plan = plans[-1]
    for scan in ("SCAN tags", "Seq Scan on tags", "SCAN manifests", "Seq Scan on manifests"):
        assert scan not in page_plan, page_plan
    assert "TEMP B-TREE" not in page_plan, page_plan
    assert "Sort" not in page_plan, page_plan
    assert "INDEX ix_tags_" in page_plan or "using ix_tags_" in page_plan, page_plan
    if repository == "acme/other":  # 5 of 5,005 versions: on the repository's index
        assert "ix_manifests_repository_" in page_plan, page_plan


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_a_manifest_or_version_lookup_is_one_statement(catalog: Catalog, by: str) -> None:
    with Session(catalog.engine) as session:
        digest = _page(session, None, 1).items[0][0].digest
    reference = "v57" if by == "tag" else _digest_of(catalog, "v57")
    with _statements(catalog.engine) as seen, Session(catalog.engine) as session:
        row = manifests.get_manifest(session, repository="acme/bot", reference=reference)
        version, tag_names, index = manifests.get_version(
            session, repository="acme/bot", reference=reference
        )
    assert row.digest == version.digest == _digest_of(catalog, "v57") != digest
    assert tag_names == ["a-57", "v57"]  # every third version has an `a-<n>` tag too
    assert index is None
    assert len([s for s in seen if s.lstrip().upper().startswith("SELECT")]) == 2, seen


def _digest_of(catalog: Catalog, tag: str) -> str:
    with Session(catalog.engine) as session:
        repository = session.scalars(
            text("SELECT id FROM repositories WHERE name = 'acme/bot'")
        ).one()
        return str(
            session.scalars(
                text("SELECT manifest_digest FROM tags WHERE repository_id = :r AND name = :t"),
                {"r": repository, "t": tag},
            ).one()
        )


@pytest.mark.parametrize(
    ("repository", "reference", "error"),
    [
        ("acme/none", "v1", NameUnknown),
        ("acme/none", "-bad-tag", NameUnknown),
        ("acme/bot", "-bad-tag", TagInvalid),
        ("acme/bot", "sha256:zz", DigestInvalid),
        ("acme/bot", "v999", ManifestUnknown),
        ("acme/bot", "sha256:" + "0" * 64, ManifestUnknown),
        ("acme/other", "v59", ManifestUnknown),  # a tag of another repository
    ],
)
def test_a_missing_manifest_names_what_is_missing(
    catalog: Catalog, repository: str, reference: str, error: type[Exception]
) -> None:
    with Session(catalog.engine) as session:
        with pytest.raises(error):
            manifests.get_manifest(session, repository=repository, reference=reference)
        with pytest.raises(error):
            manifests.get_version(session, repository=repository, reference=reference)
