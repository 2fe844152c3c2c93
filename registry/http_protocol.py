"""uvicorn's httptools protocol, with request bodies handed over in large pieces.

uvicorn pauses reading once 64 KiB of a request body wait for the app and
resumes at the app's next `receive()`; the body grows by `bytes +=`. A
1 GiB blob upload then crosses the event loop about 16,000 times (a pause,
a resume, a task wake-up and a message each), which cost more server CPU
than hashing the bytes (profiled with py-spy: 1.9 CPU-s per GiB in the
loop and the protocol, against 0.8 s for sha256). Here a body that
outgrows `SMALL_BODY` collects in a `bytearray` (amortised appends, no
quadratic copying) and reading pauses only at `HIGH_WATER` (4 MiB), so the
app receives a few hundred messages per GiB. Small bodies (JSON, manifests)
stay `bytes` exactly as uvicorn hands them over.

Only `on_body` changes, a method of the pinned uvicorn release; the tests
run the server with this protocol, so a change of that method upstream
shows there first.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

SMALL_BODY = 64 * 1024  # below this the body stays `bytes`, as uvicorn makes it
HIGH_WATER = 4 * 1024 * 1024  # buffered body bytes at which reading pauses


class LargeBodyHttpToolsProtocol(HttpToolsProtocol):
    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        if isinstance(cycle.body, bytearray):
            cycle.body += body
        elif len(cycle.body) + len(body) > SMALL_BODY:
            buffer = bytearray(cycle.body)
            buffer += body
            cycle.body = buffer  # bytes-like, as the app uses ASGI bodies
        else:
            cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.flow.pause_reading()
        cycle.message_event.set()
