"""`GET /schemas/<name>`: the JSON schemas of the artifacts' config blobs, for other tools."""

from __future__ import annotations

import json

from fastapi import APIRouter, Response

from peftreg.artifact_schemas import SCHEMA_MEDIA_TYPE, UnknownSchema, config_schema
from peftreg.registry.api.openapi import failures
from peftreg.registry.errors import NotFound

router = APIRouter()


@router.get("/schemas/{name}", responses=failures(NotFound))
async def get_schema(name: str) -> Response:
    try:
        schema = config_schema(name)
    except UnknownSchema as exc:
        raise NotFound(str(exc), detail={"schema": name}) from None
    return Response(
        json.dumps(schema, indent=2, sort_keys=True),
        media_type=SCHEMA_MEDIA_TYPE,
        headers={"Cache-Control": "public, max-age=3600"},
    )
