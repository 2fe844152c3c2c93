"""`/metrics`: the app's Prometheus metrics, in the text exposition format.

Unauthenticated, like `/healthz` and `/readyz`: Prometheus scrapers do not
carry registry tokens, and the numbers name no repository, tag or user
(routes appear as templates). Operators who must not expose them keep the
path off their ingress (or restrict it with a network policy) and scrape the
pods directly.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import ServicesDep
from peftreg.registry.api.openapi import body
from peftreg.registry.observability.metrics import CONTENT_TYPE

router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: body("Prometheus text exposition", (CONTENT_TYPE,), {"type": "string"})},
)
async def metrics(services: ServicesDep) -> Response:
    # Rendering reads the queue and worker sources, which query the database.
    body = await run_in_threadpool(services.metrics.render)
    return Response(content=body, media_type=CONTENT_TYPE)
