"""Browse pages: repositories by namespace, and versions with the catalog's search filters."""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.orm import Session

from peftreg.adapters.schema import ADAPTER_KINDS, BaseQuantization
from peftreg.registry.api.deps import authorize, authorize_any, in_read_transaction
from peftreg.registry.catalog import search
from peftreg.registry.catalog.repositories import find_repository, valid_name
from peftreg.registry.errors import InvalidRequest
from peftreg.registry.state import Services
from peftreg.registry.web.rendering import WebRoute, page, redirect
from peftreg.registry.web.session import Viewer, get_viewer

router = APIRouter(prefix="/ui", route_class=WebRoute, include_in_schema=False)
ViewerDep = Annotated[Viewer, Depends(get_viewer)]
PAGE_SIZE = 50
KINDS: tuple[str, ...] = (*ADAPTER_KINDS, "hard_prompt", "base")
QUANTIZATIONS: tuple[str, ...] = get_args(BaseQuantization)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.get("")
async def root(request: Request, viewer: ViewerDep) -> Response:
    return redirect(request, viewer, "/ui/")


@router.get("/")
async def repositories(
    request: Request, viewer: ViewerDep, q: str | None = None, cursor: str | None = None
) -> Response:
    authorize_any(viewer.principal)
    found = await in_read_transaction(
        services_of(request),
        partial(
            search.list_repositories,
            principal=viewer.principal,
            query=q or None,
            cursor=cursor,
            limit=PAGE_SIZE * 2,
        ),
    )
    namespaces: dict[str, list[search.RepositorySummary]] = defaultdict(list)
    for item in found.items:
        namespaces[item.name.split("/", 1)[0]].append(item)
    context = {"namespaces": dict(namespaces), "q": q or "", "next_cursor": found.next_cursor}
    return page(request, viewer, "repositories.html", context)


def _filters(params: dict[str, str]) -> search.ArtifactFilters:
    kind = params.get("kind") or None
    if kind is not None and kind not in KINDS:
        raise InvalidRequest(f"unknown kind {kind!r}")
    rank = params.get("max_rank") or None
    if rank is not None and (not rank.isdigit() or len(rank) > 6):
        raise InvalidRequest(f"max_rank {rank!r} is not a non-negative integer")
    quantization = params.get("base_quantization") or None
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise InvalidRequest(f"unknown base quantization {quantization!r}")
    verified = {"yes": True, "no": False}.get(params.get("verified", ""))
    return search.ArtifactFilters(
        kind=kind,
        base_fingerprint=params.get("base") or None,
        max_rank=int(rank) if rank is not None else None,
        base_quantization=quantization,
        verified=verified,
    )


def _versions_and_bases(
    session: Session,
    *,
    viewer: Viewer,
    repository: str | None,
    filters: search.ArtifactFilters,
    cursor: str | None,
) -> tuple[Any, Any, Any]:
    repo = find_repository(session, name=repository) if repository else None
    found = search.list_versions(
        session,
        principal=viewer.principal,
        repository=repository,
        artifact_type=None,
        annotations={},
        cursor=cursor,
        limit=PAGE_SIZE,
        filters=filters,
    )
    bases = search.list_versions(
        session,
        principal=viewer.principal,
        repository=None,
        artifact_type=None,
        annotations={},
        cursor=None,
        limit=100,
        filters=search.ArtifactFilters(kind="base"),
    )
    return repo, found, bases


async def _versions_page(request: Request, viewer: Viewer, repository: str | None) -> Response:
    params = dict(request.query_params)
    filters = _filters(params)
    repo, found, bases = await in_read_transaction(
        services_of(request),
        partial(
            _versions_and_bases,
            viewer=viewer,
            repository=repository,
            filters=filters,
            cursor=params.get("cursor") or None,
        ),
    )
    base_choices: dict[str, str] = {}
    for manifest, name, tag_names, index in bases.items:
        if index is not None and index.fingerprint:
            label = f"{name}:{tag_names[0]}" if tag_names else f"{name}@{manifest.digest[:19]}"
            base_choices.setdefault(index.fingerprint, label)
    query = {key: value for key, value in params.items() if key != "cursor" and value}
    context = {
        "repository": repository,
        "repo": repo,
        "versions": found.items,
        "next_cursor": found.next_cursor,
        "params": params,
        "query": query,
        "kinds": KINDS,
        "quantizations": QUANTIZATIONS,
        "bases": base_choices,
        "can_write": repository is not None and viewer.principal.can("write", repository),
    }
    return page(request, viewer, "versions.html", context)


@router.get("/versions")
async def versions(request: Request, viewer: ViewerDep) -> Response:
    authorize_any(viewer.principal)
    return await _versions_page(request, viewer, None)


@router.get("/r/{name:path}")
async def repository(name: str, request: Request, viewer: ViewerDep) -> Response:
    valid_name(name)
    authorize(viewer.principal, "read", name)
    return await _versions_page(request, viewer, name)
