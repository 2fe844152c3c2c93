"""The server's HTTP protocol hands request bodies over whole, in order, in bounded pieces."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from peftreg.registry.http_protocol import HIGH_WATER, LargeBodyHttpToolsProtocol
from tests.fixtures.server import free_port

MiB = 1024 * 1024


async def _record_body(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    hasher = hashlib.sha256()
    sizes: list[int] = []
    kinds: set[str] = set()
    while True:
        message = await receive()
        body = message.get("body", b"")
        hasher.update(body)
        sizes.append(len(body))
        kinds.add(type(body).__name__)
        if not message.get("more_body"):
            break
    payload = json.dumps(
        {"sha256": hasher.hexdigest(), "sizes": sizes, "kinds": sorted(kinds)}
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        _record_body,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=LargeBodyHttpToolsProtocol,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # readiness poll with a deadline
        assert thread.is_alive(), "server stopped"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_a_large_body_arrives_whole_and_in_bounded_pieces(url: str) -> None:
    content = os.urandom(24 * MiB)

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(content), 64 * 1024):
            yield content[start : start + 64 * 1024]

    response = httpx.post(
        f"{url}/", content=pieces(), headers={"Content-Length": str(len(content))}, timeout=60
    )
    seen = response.json()
    assert seen["sha256"] == hashlib.sha256(content).hexdigest()
    assert sum(seen["sizes"]) == len(content)
    # Reading pauses at the high-water mark: a piece is that plus at most one socket read.
    assert max(seen["sizes"]) <= HIGH_WATER + 4 * MiB


def test_a_small_body_stays_bytes(url: str) -> None:
    response = httpx.post(f"{url}/", content=b'{"small": true}', timeout=30)
    seen = response.json()
    assert seen["kinds"] == ["bytes"]
    assert seen["sha256"] == hashlib.sha256(b'{"small": true}').hexdigest()
