"""The `peftreg.sendfile` ASGI extension: what an app may send instead of a body.

Offered in `scope["extensions"]` by the server `peftreg serve` runs
(`peftreg.registry.zero_copy`, on plain HTTP). After `http.response.start`
with a Content-Length, the app sends one message

    {"type": "peftreg.sendfile", "file": <open binary file>, "offset": int, "count": int}

and the server sends those bytes of the file from the kernel; the app closes
the file once `send` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, BinaryIO

SENDFILE = "peftreg.sendfile"


def offers_sendfile(scope: Mapping[str, Any]) -> bool:
    return SENDFILE in (scope.get("extensions") or {})


def sendfile_message(file: BinaryIO, offset: int, count: int) -> dict[str, Any]:
    return {"type": SENDFILE, "file": file, "offset": offset, "count": count}
