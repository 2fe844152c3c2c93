"""The `peftreg.draining` ASGI extension: the server has begun to shut down.

Offered in `scope["extensions"]` by the server `peftreg serve` runs
(`peftreg.registry.zero_copy`). Its `"event"` entry is an `asyncio.Event`
that is set when a graceful shutdown begins while the request is in flight.

uvicorn stops accepting connections, then waits for the requests in flight
to end, up to its graceful timeout, before it tells the app (lifespan).
Most requests end soon; a long poll does not. A tag watch or a job's event
stream would hold the shutdown for the whole timeout, then be cancelled with
no answer sent. Those that look at the event answer at once instead, as at
their own deadline, and the client asks again, of a server that is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

DRAINING = "peftreg.draining"


def draining_of(scope: Mapping[str, Any]) -> asyncio.Event:
    """The request's draining event; one that is never set where the server offers none."""
    offered = (scope.get("extensions") or {}).get(DRAINING)
    return asyncio.Event() if offered is None else offered["event"]
