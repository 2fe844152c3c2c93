"""OCI manifests (PUT/GET/HEAD/DELETE by tag or digest), tags list, referrers."""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from peftreg.manifest import OCI_INDEX
from peftreg.registry.api.caching import content_cache_headers, not_modified
from peftreg.registry.api.deps import (
    SQL_INTEGER_MAX,
    PrincipalDep,
    ServicesDep,
    authorize,
    in_read_statements,
    in_read_transaction,
    in_transaction,
)
from peftreg.registry.api.openapi import MANIFEST_BODY, OCI_INDEX_SCHEMA, body, failures, no_body
from peftreg.registry.catalog import manifests, oci_delete, tags
from peftreg.registry.catalog.blobs import parse_digest
from peftreg.registry.catalog.repositories import find_repository, valid_name
from peftreg.registry.errors import (
    ArtifactInvalid,
    DeleteUnsupported,
    DigestInvalid,
    LayerTitleInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestTooLarge,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SafetensorsInvalid,
    TagImmutable,
    TagInvalid,
)

router = APIRouter()
TAG_LIST = {
    "type": "object",
    "required": ["name", "tags"],
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ManifestTooLarge(
            f"manifest is {declared} bytes; the limit is {limit}", detail={"limit": limit}
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ManifestTooLarge(
                f"manifest exceeds the {limit}-byte limit", detail={"limit": limit}
            )
    return bytes(body)


@router.put(
    "/v2/{name:path}/manifests/{reference}",
    status_code=201,
    response_class=Response,
    responses={
        201: no_body(
            "Manifest stored (and tagged)",
            Location="The manifest's URL",
            **{"Docker-Content-Digest": "The manifest's digest"},
        ),
        **failures(
            NameInvalid,
            TagInvalid,
            DigestInvalid,
            ManifestInvalid,
            ManifestBlobUnknown,
            ManifestTooLarge,
            ArtifactInvalid,
            SafetensorsInvalid,
            LayerTitleInvalid,
            TagImmutable,
        ),
    },
)
async def put_manifest(
    name: str, reference: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "write", name)
    content = await read_limited(request, services.settings.max_manifest_bytes)
    result = await in_transaction(
        services,
        partial(
            manifests.put_manifest,
            principal=principal,
            repository=name,
            reference=reference,
            content=content,
            content_type=request.headers.get("content-type"),
            extra_tags=request.query_params.getlist("tag"),
            store=services.store,
        ),
    )
    headers = {
        "Location": f"/v2/{name}/manifests/{result.digest}",
        "Docker-Content-Digest": result.digest,
        "Content-Length": "0",
    }
    if result.subject:
        headers["OCI-Subject"] = result.subject
    return Response(status_code=201, headers=headers)


@router.api_route(
    "/v2/{name:path}/manifests/{reference}",
    methods=["GET", "HEAD"],
    response_class=Response,
    responses={
        200: MANIFEST_BODY,
        **failures(NameInvalid, NameUnknown, TagInvalid, DigestInvalid, ManifestUnknown),
    },
)
async def get_manifest(
    name: str, reference: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "read", name)
    row = await in_read_statements(
        services, partial(manifests.get_manifest, repository=name, reference=reference)
    )
    headers = {
        "Docker-Content-Digest": row.digest,
        "Content-Type": row.media_type,
        "Content-Length": str(row.size),
        **content_cache_headers(row.digest, immutable=manifests.is_digest(reference)),
    }
    if not_modified(request, row.digest):
        return Response(
            status_code=304, headers={k: v for k, v in headers.items() if k != "Content-Length"}
        )
    if request.method == "HEAD":
        return Response(status_code=200, headers=headers)
    return Response(content=row.content, status_code=200, headers=headers, media_type=None)


@router.delete(
    "/v2/{name:path}/manifests/{reference}",
    status_code=202,
    response_class=Response,
    responses={
        202: no_body("Version deleted (by digest) or untagged (by tag)"),
        **failures(
            NameInvalid,
            NameUnknown,
            TagInvalid,
            DigestInvalid,
            ManifestUnknown,
            DeleteUnsupported,
        ),
    },
)
async def delete_manifest(
    name: str, reference: str, services: ServicesDep, principal: PrincipalDep
) -> Response:
    """By tag: untag. By digest: delete the version and its movable tags (see oci_delete)."""
    valid_name(name)
    authorize(principal, "admin" if manifests.is_digest(reference) else "write", name)
    await in_transaction(
        services,
        partial(
            oci_delete.delete_reference, principal=principal, repository=name, reference=reference
        ),
    )
    return Response(status_code=202)


@router.get(
    "/v2/{name:path}/tags/list",
    responses={
        200: body("Tags, a page", ("application/json",), TAG_LIST),
        **failures(NameInvalid, NameUnknown),
    },
)
async def list_tags(
    name: str,
    services: ServicesDep,
    principal: PrincipalDep,
    n: Annotated[int | None, Query(ge=0, le=SQL_INTEGER_MAX)] = None,
    last: str | None = None,
) -> Response:
    valid_name(name)
    authorize(principal, "read", name)

    def work(session: Session) -> list[str]:
        repo = find_repository(session, name=name)
        limit = None if n is None else n + 1
        return tags.list_tags(session, repository=repo, limit=limit, last=last)

    names = await in_read_statements(services, work)
    headers = {}
    if n is not None and len(names) > n:
        names = names[:n]
        if names:  # n=0 asks for an empty page: there is no `last` to continue from
            query = urlencode({"n": n, "last": names[-1]})
            headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
    return JSONResponse({"name": name, "tags": names}, headers=headers)


@router.get(
    "/v2/{name:path}/referrers/{digest}",
    response_class=Response,
    responses={
        200: body("Manifests whose subject is the digest", (OCI_INDEX,), OCI_INDEX_SCHEMA),
        **failures(NameInvalid, NameUnknown, DigestInvalid),
    },
)
async def referrers(
    name: str,
    digest: str,
    services: ServicesDep,
    principal: PrincipalDep,
    artifact_type: str | None = None,
    artifactType: str | None = None,  # noqa: N803 - the OCI query parameter's name
) -> Response:
    valid_name(name)
    authorize(principal, "read", name)
    wanted = artifactType or artifact_type
    subject = str(parse_digest(digest))
    index = await in_read_transaction(
        services,
        partial(manifests.referrers, repository=name, digest=subject, artifact_type=wanted),
    )
    headers = {"OCI-Filters-Applied": "artifactType"} if wanted else {}
    return Response(
        content=json.dumps(index), media_type=OCI_INDEX, headers=headers, status_code=200
    )
