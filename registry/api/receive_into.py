"""The `peftreg.receive_into` ASGI extension: a request body written into a file by the server.

Offered in `scope["extensions"]` by the server `peftreg serve` runs
(`peftreg.registry.zero_copy`, on plain HTTP, for a body of known length).
The extension's `"receive_into"` entry is a coroutine function

    await receive_into(fd, landed) -> bool

that writes the rest of the request body (what `receive` has not returned
yet) into the open file `fd` at its position, moving it from the socket in
the kernel (`splice`), and calls `landed(n)`, from a worker thread, as each
further `n` bytes are in the file. It returns True once the whole body has
landed (a later `receive` answers an empty last `http.request`), or False
when the connection broke first: what landed stays, and a later `receive`
answers `http.disconnect`. The app must not call `receive` while it runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

RECEIVE_INTO = "peftreg.receive_into"
ReceiveInto = Callable[[int, Callable[[int], None]], Awaitable[bool]]


def receive_into_of(scope: Mapping[str, Any]) -> ReceiveInto | None:
    """The server's `receive_into` for this request, or None where it is not offered."""
    offered = (scope.get("extensions") or {}).get(RECEIVE_INTO)
    return None if offered is None else offered["receive_into"]
