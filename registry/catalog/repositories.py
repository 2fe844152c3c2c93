"""Repositories: created on first push, each with its tag policy."""

from __future__ import annotations

import fnmatch

from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.names import InvalidName, check_repository_name
from peftreg.registry.db.models import Repository
from peftreg.registry.db.upsert import insert_ignore
from peftreg.registry.errors import NameInvalid, NameUnknown

DEFAULT_IMMUTABLE_TAGS = ["v*"]


def valid_name(name: str) -> str:
    try:
        return check_repository_name(name)
    except InvalidName as exc:
        raise NameInvalid(str(exc), detail={"name": name}) from None


def find_repository(session: Session, *, name: str) -> Repository:
    repository = session.scalar(select(Repository).where(Repository.name == valid_name(name)))
    if repository is None:
        raise NameUnknown(f"repository {name!r} does not exist", detail={"name": name})
    return repository


def repository_id_of(session: Session, *, name: str) -> int:
    """`find_repository(...).id`, reading the id alone."""
    found = session.scalar(select(Repository.id).where(Repository.name == valid_name(name)))
    if found is None:
        raise NameUnknown(f"repository {name!r} does not exist", detail={"name": name})
    return found


def ensure_repository(session: Session, *, name: str) -> Repository:
    """The repository, created with the default tag policy if new (race-safe)."""
    valid_name(name)
    insert_ignore(session, Repository, name=name, immutable_tags=DEFAULT_IMMUTABLE_TAGS)
    repository = session.scalar(select(Repository).where(Repository.name == name))
    assert repository is not None
    return repository


def is_immutable_tag(repository: Repository, tag: str) -> bool:
    return any(fnmatch.fnmatchcase(tag, pattern) for pattern in repository.immutable_tags)
