"""Structured logs: the server's JSON lines carry the request id its responses announce."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from peftreg.registry.context import set_request_id
from peftreg.registry.observability.logging import configure_logging
from tests.fixtures.server import RegistryProcess

DEADLINE = 15.0


def json_lines(server: RegistryProcess) -> list[dict[str, Any]]:
    """The server log's JSON lines (click's start-up banner is plain text)."""
    found = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))  # every JSON-looking line must parse
    return found


def line_for(server: RegistryProcess, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while True:
        for record in json_lines(server):
            if record.get("request_id") == request_id:
                return record
        assert time.monotonic() < deadline, f"no log line with request id {request_id}"
        time.sleep(0.05)  # polling the log file with a deadline


def test_request_log_lines_are_json_with_the_request_id(
    json_logging_server: RegistryProcess,
) -> None:
    url = json_logging_server.url
    response = httpx.get(f"{url}/v2/acme/nothing/tags/list", timeout=30)
    assert response.status_code == 404
    request_id = response.headers["X-Request-Id"]
    assert response.json()["request_id"] == request_id

    record = line_for(json_logging_server, request_id)
    assert record["logger"] == "peftreg.registry.api.middleware"
    assert record["level"] == "INFO"
    assert record["method"] == "GET"
    assert record["path"] == "/v2/acme/nothing/tags/list"
    assert record["status"] == 404
    assert record["message"] == "GET /v2/acme/nothing/tags/list -> 404"
    assert record["time"].endswith("+00:00")
    assert isinstance(record["duration_ms"], float)

    # A caller's own id is kept, echoed and logged.
    given = httpx.get(f"{url}/healthz", headers={"X-Request-Id": "trace-42"}, timeout=30)
    assert given.headers["X-Request-Id"] == "trace-42"
    assert line_for(json_logging_server, "trace-42")["path"] == "/healthz"
    # uvicorn's own lines are JSON too; outside a request they carry no request id.
    uvicorn = [r for r in json_lines(json_logging_server) if r["logger"].startswith("uvicorn")]
    assert any(r["message"] == "Application startup complete." for r in uvicorn)
    assert all("request_id" not in r for r in uvicorn)


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    set_request_id(None)


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_formats() -> None:
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    configure_logging("json", "debug", stream=stream)  # a second call replaces the handler
    log = logging.getLogger("tests.observability")
    set_request_id("req-1")
    log.debug("pushed %s", "acme/bot:v1", extra={"size": 12})
    set_request_id(None)
    log.warning("outside a request")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "pushed acme/bot:v1"
    assert (first["request_id"], first["size"], first["level"]) == ("req-1", 12, "DEBUG")
    assert first["logger"] == "tests.observability"
    assert "request_id" not in second

    text = io.StringIO()
    configure_logging("text", logging.INFO, stream=text)
    set_request_id("req-2")
    log.info("hello")
    log.debug("hidden")
    (line,) = text.getvalue().splitlines()
    assert line.endswith("INFO tests.observability [req-2] hello")

    with pytest.raises(ValueError, match="unknown log format 'yaml'"):
        configure_logging("yaml", "info")  # type: ignore[arg-type]
