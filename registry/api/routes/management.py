"""The JSON management API under `/api/v1`."""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.digest import Digest
from peftreg.formats.bounded_json import loads_bounded
from peftreg.registry.api.deps import (
    SQL_INTEGER_MAX,
    PrincipalDep,
    ServicesDep,
    authorize,
    authorize_any,
    authorize_global_admin,
    in_read_statements,
    in_read_transaction,
    in_transaction,
)
from peftreg.registry.api.openapi import failures
from peftreg.registry.api.schemas import (
    AuditEventOut,
    DeletedVersionOut,
    IssuedTokenOut,
    PolicyIn,
    RepositoryOut,
    RepositoryPage,
    TagEventOut,
    TagOut,
    TokenIn,
    TokenOut,
    VersionDetail,
    VersionPage,
)
from peftreg.registry.auth import tokens
from peftreg.registry.catalog import audit, manifests, search, tags
from peftreg.registry.catalog.repositories import find_repository, is_immutable_tag, valid_name
from peftreg.registry.catalog.tags import valid_tag
from peftreg.registry.db.models import ArtifactIndex, AuditEvent, Manifest, Tag
from peftreg.registry.errors import (
    DigestInvalid,
    InvalidRequest,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    TagImmutable,
    TagInvalid,
    TokenUnknown,
    VersionInUse,
)
from peftreg.registry.state import Services
from peftreg.registry.storage.errors import BlobNotFound

router = APIRouter(prefix="/api/v1", tags=["management"])
MAX_DECODED_CONFIG = 1024 * 1024
Limit = Annotated[int, Query(ge=1, le=1000)]


def _summary(index: ArtifactIndex | search.IndexSummary | None) -> dict[str, Any] | None:
    if index is None:
        return None
    return {
        "kind": index.kind,
        "rank": index.max_rank,
        "base_fingerprint": index.base_fingerprint,
        "base_quantization": index.base_quantization,
        "verified": index.verified,
        "fingerprint": index.fingerprint,
    }


def _version_fields(
    manifest: Manifest | search.ListedVersion,
    repository: str,
    tag_names: list[str],
    index: ArtifactIndex | search.IndexSummary | None = None,
) -> dict[str, Any]:
    """A version's `VersionOut` fields as plain data.

    The response models validate these in pydantic-core, which for a page of
    100 is several times faster than building the models field by field in
    Python (`model_construct`).
    """
    return {
        "repository": repository,
        "digest": manifest.digest,
        "media_type": manifest.media_type,
        "artifact_type": manifest.artifact_type,
        "size": manifest.size,
        "annotations": manifest.annotations or {},
        "subject": manifest.subject_digest,
        "tags": tag_names,
        "pushed_by": manifest.pushed_by,
        "created_at": manifest.created_at,
        "adapter": _summary(index),
    }


@router.get("/repositories", response_model=RepositoryPage, responses=failures(InvalidRequest))
async def list_repositories(
    services: ServicesDep,
    principal: PrincipalDep,
    q: str | None = None,
    cursor: str | None = None,
    limit: Limit = 100,
) -> RepositoryPage:
    authorize_any(principal)
    page = await in_read_transaction(
        services,
        partial(search.list_repositories, principal=principal, query=q, cursor=cursor, limit=limit),
    )
    return RepositoryPage(
        items=[RepositoryOut(**vars(item)) for item in page.items], next_cursor=page.next_cursor
    )


async def _versions(
    services: Services,
    principal: PrincipalDep,
    repository: str | None,
    artifact_type: str | None,
    annotation: list[str],
    cursor: str | None,
    limit: int,
    artifact_filters: search.ArtifactFilters,
) -> Response:
    filters = search.parse_annotation_filters(annotation)
    page = await in_read_statements(
        services,
        partial(
            search.list_versions,
            principal=principal,
            repository=repository,
            artifact_type=artifact_type,
            annotations=filters,
            cursor=cursor,
            limit=limit,
            filters=artifact_filters,
        ),
    )
    items = [_version_fields(*item) for item in page.items]
    return _json(VersionPage.model_validate({"items": items, "next_cursor": page.next_cursor}))


def _json(model: BaseModel) -> Response:
    """A model as the response body, serialized once.

    The routes keep `response_model` for the OpenAPI document; returning a
    `Response` skips FastAPI's second validation of what was just built.
    """
    return Response(content=model.model_dump_json(by_alias=True), media_type="application/json")


@router.get("/versions", response_model=VersionPage, responses=failures(InvalidRequest))
async def search_versions(
    services: ServicesDep,
    principal: PrincipalDep,
    artifact_type: str | None = None,
    annotation: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI query list
    cursor: str | None = None,
    limit: Limit = 100,
    kind: str | None = None,
    base: str | None = None,
    max_rank: Annotated[int | None, Query(ge=0, le=SQL_INTEGER_MAX)] = None,
    base_quantization: str | None = None,
    verified: bool | None = None,
) -> Response:
    """Versions across every repository the caller may read, newest first.

    `kind`, `base` (a base fingerprint), `max_rank`, `base_quantization` and
    `verified` filter on what validation indexed: they keep adapter (and base)
    artifacts only.
    """
    authorize_any(principal)
    filters = search.ArtifactFilters(kind, base, max_rank, base_quantization, verified)
    return await _versions(
        services, principal, None, artifact_type, annotation, cursor, limit, filters
    )


@router.get(
    "/repositories/{name:path}/versions",
    response_model=VersionPage,
    responses=failures(NameInvalid, NameUnknown, InvalidRequest),
)
async def list_versions(
    name: str,
    services: ServicesDep,
    principal: PrincipalDep,
    artifact_type: str | None = None,
    annotation: Annotated[list[str], Query()] = [],  # noqa: B006
    cursor: str | None = None,
    limit: Limit = 100,
    kind: str | None = None,
    base: str | None = None,
    max_rank: Annotated[int | None, Query(ge=0, le=SQL_INTEGER_MAX)] = None,
    base_quantization: str | None = None,
    verified: bool | None = None,
) -> Response:
    valid_name(name)
    authorize(principal, "read", name)
    filters = search.ArtifactFilters(kind, base, max_rank, base_quantization, verified)
    return await _versions(
        services, principal, name, artifact_type, annotation, cursor, limit, filters
    )


@router.get(
    "/repositories/{name:path}/versions/{reference}",
    response_model=VersionDetail,
    responses=failures(NameInvalid, NameUnknown, TagInvalid, DigestInvalid, ManifestUnknown),
)
async def get_version(
    name: str, reference: str, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "read", name)

    def work(session: Session) -> tuple[Manifest, list[str], ArtifactIndex | None, Any, Any]:
        row, tag_names, index = manifests.get_version(session, repository=name, reference=reference)
        document = json.loads(row.content)
        # A store read: here on the worker thread, off the event loop.
        config = _decoded_config(services, row.config_digest, document)
        return row, tag_names, index, document, config

    row, tag_names, index, document, config = await in_read_statements(services, work)
    fields = _version_fields(row, name, tag_names, index)
    return _json(VersionDetail.model_validate({**fields, "manifest": document, "config": config}))


def _decoded_config(services: Services, digest: str | None, document: dict[str, Any]) -> Any:
    """The config blob as JSON when it is JSON and small (by its stored size)."""
    if digest is None:
        return None
    media_type = str(document.get("config", {}).get("mediaType", ""))
    if "json" not in media_type:
        return None
    try:
        parsed = Digest.parse(digest)
        if services.store.stat(parsed) > MAX_DECODED_CONFIG:
            return None
        return loads_bounded(b"".join(services.store.read(parsed)))
    except (BlobNotFound, ValueError):
        return None


@router.delete(
    "/repositories/{name:path}/versions/{reference}",
    response_model=DeletedVersionOut,
    responses=failures(
        NameInvalid, NameUnknown, DigestInvalid, ManifestUnknown, VersionInUse, TagImmutable
    ),
)
async def delete_version(
    name: str, reference: str, services: ServicesDep, principal: PrincipalDep, force: bool = False
) -> DeletedVersionOut:
    """Delete a version; refused (409) while a tag points at it unless `force`."""
    valid_name(name)
    authorize(principal, "admin", name)
    removed = await in_transaction(
        services,
        partial(
            manifests.delete_manifest,
            principal=principal,
            repository=name,
            digest=reference,
            force=force,
        ),
    )
    return DeletedVersionOut(digest=reference, tags_removed=removed)


@router.get(
    "/repositories/{name:path}/tags",
    response_model=list[TagOut],
    responses=failures(NameInvalid, NameUnknown),
)
async def list_tags(name: str, services: ServicesDep, principal: PrincipalDep) -> list[TagOut]:
    valid_name(name)
    authorize(principal, "read", name)

    def work(session: Session) -> list[TagOut]:
        repo = find_repository(session, name=name)
        rows = session.scalars(select(Tag).where(Tag.repository_id == repo.id).order_by(Tag.name))
        return [
            TagOut(
                name=row.name,
                digest=row.manifest_digest,
                immutable=is_immutable_tag(repo, row.name),
                updated_at=row.updated_at,
            )
            for row in rows
        ]

    return await in_read_transaction(services, work)


@router.get(
    "/repositories/{name:path}/tags/{tag}/history",
    response_model=list[TagEventOut],
    responses=failures(NameInvalid, NameUnknown, TagInvalid),
)
async def tag_history(
    name: str, tag: str, services: ServicesDep, principal: PrincipalDep
) -> list[TagEventOut]:
    valid_name(name)
    valid_tag(tag)
    authorize(principal, "read", name)

    def work(session: Session) -> list[TagEventOut]:
        repo = find_repository(session, name=name)
        return [
            TagEventOut.model_validate(event)
            for event in tags.tag_history(session, repository=repo, tag=tag)
        ]

    return await in_read_transaction(services, work)


@router.put(
    "/repositories/{name:path}/policy",
    response_model=RepositoryOut,
    responses=failures(NameInvalid, NameUnknown),
)
async def set_policy(
    name: str, policy: PolicyIn, services: ServicesDep, principal: PrincipalDep
) -> RepositoryOut:
    valid_name(name)
    authorize(principal, "admin", name)

    def work(session: Session) -> RepositoryOut:
        repo = find_repository(session, name=name)
        repo.immutable_tags = list(policy.immutable_tags)
        audit.record(
            session,
            actor=principal.name,
            action="repository.policy",
            repository=name,
            detail={"immutable_tags": policy.immutable_tags},
        )
        page = search.list_repositories(
            session, principal=principal, query=name, cursor=None, limit=1000
        )
        match = next(item for item in page.items if item.name == name)
        return RepositoryOut(**vars(match))

    return await in_transaction(services, work)


@router.post(
    "/tokens",
    response_model=IssuedTokenOut,
    status_code=201,
    responses=failures(InvalidRequest),
)
async def create_token(
    body: TokenIn, services: ServicesDep, principal: PrincipalDep
) -> IssuedTokenOut:
    authorize_global_admin(principal)

    def work(session: Session) -> IssuedTokenOut:
        issued = tokens.create_token(
            session,
            name=body.name,
            grants=[grant.model_dump() for grant in body.grants],
            created_by=principal.name,
            expires_at=body.expires_at,
        )
        audit.record(session, actor=principal.name, action="token.create", target=issued.id)
        return IssuedTokenOut(
            id=issued.id, name=issued.name, grants=issued.grants, token=issued.secret
        )

    return await in_transaction(services, work)


@router.get("/tokens", response_model=list[TokenOut])
async def list_tokens(services: ServicesDep, principal: PrincipalDep) -> list[TokenOut]:
    authorize_global_admin(principal)
    rows = await in_transaction(services, tokens.list_tokens)
    return [TokenOut.model_validate(row) for row in rows]


@router.delete("/tokens/{token_id}", response_model=TokenOut, responses=failures(TokenUnknown))
async def revoke_token(token_id: str, services: ServicesDep, principal: PrincipalDep) -> TokenOut:
    authorize_global_admin(principal)

    def work(session: Session) -> TokenOut:
        row = tokens.revoke_token(session, token_id=token_id)
        audit.record(session, actor=principal.name, action="token.revoke", target=token_id)
        return TokenOut.model_validate(row)

    return await in_transaction(services, work)


@router.get("/audit", response_model=list[AuditEventOut])
async def audit_log(
    services: ServicesDep,
    principal: PrincipalDep,
    repository: str | None = None,
    limit: Limit = 100,
) -> list[AuditEventOut]:
    authorize_global_admin(principal)

    def work(session: Session) -> list[AuditEventOut]:
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if repository is not None:
            query = query.where(AuditEvent.repository == repository)
        return [AuditEventOut.model_validate(row) for row in session.scalars(query)]

    return await in_transaction(services, work)
