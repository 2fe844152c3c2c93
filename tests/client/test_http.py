"""Unit tests of our own seam: error mapping and retries (httpx.MockTransport)."""

from __future__ import annotations

import httpx
import pytest

from peftreg.sdk import Client
from peftreg.sdk.errors import (
    Conflict,
    DigestMismatch,
    Forbidden,
    InvalidRequest,
    NotFound,
    PeftregError,
    ServerError,
    TransportError,
    Unauthorized,
)
from peftreg.sdk.http import HttpSession, error_from_response


def _error(status: int, code: str, message: str = "nope") -> httpx.Response:
    return httpx.Response(
        status,
        json={"errors": [{"code": code, "message": message}], "request_id": "rid-1"},
        headers={"X-Request-Id": "rid-1"},
        request=httpx.Request("GET", "http://registry/v2/x"),
    )


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (404, "MANIFEST_UNKNOWN", NotFound),
        (404, "BLOB_UNKNOWN", NotFound),
        (401, "UNAUTHORIZED", Unauthorized),
        (403, "DENIED", Forbidden),
        (409, "TAG_IMMUTABLE", Conflict),
        (409, "VERSION_IN_USE", Conflict),
        (400, "DIGEST_INVALID", DigestMismatch),
        (400, "MANIFEST_INVALID", InvalidRequest),
        (503, "UNAVAILABLE", ServerError),
        (500, "UNKNOWN", ServerError),
    ],
)
def test_error_mapping(status: int, code: str, cls: type[PeftregError]) -> None:
    error = error_from_response(_error(status, code, "the message"))
    assert type(error) is cls
    assert (error.code, error.status, error.request_id) == (code, status, "rid-1")
    assert str(error) == "the message (request id rid-1)"


def test_error_without_oci_body() -> None:
    response = httpx.Response(502, text="bad gateway", request=httpx.Request("GET", "http://r/v2/"))
    error = error_from_response(response)
    assert isinstance(error, ServerError)
    assert "502" in error.message


def _session(handler: object, retries: int = 3) -> tuple[HttpSession, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)  # type: ignore[operator, no-any-return]

    session = HttpSession(
        "http://registry", transport=httpx.MockTransport(record), retries=retries, backoff=0
    )
    return session, seen


def test_idempotent_get_is_retried_on_503_then_succeeds() -> None:
    answers = iter([httpx.Response(503), httpx.Response(503), httpx.Response(200, json={})])
    session, seen = _session(lambda _r: next(answers))
    assert session.request("GET", "/v2/").status_code == 200
    assert len(seen) == 3


def test_connection_errors_are_retried_then_raised_as_transport_error() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    session, seen = _session(fail, retries=2)
    with pytest.raises(TransportError):
        session.request("DELETE", "/v2/a/b/manifests/x")
    assert len(seen) == 3


def test_post_and_patch_are_not_retried() -> None:
    session, seen = _session(lambda _r: httpx.Response(503))
    with pytest.raises(ServerError):
        session.request("POST", "/v2/a/b/blobs/uploads/")
    with pytest.raises(ServerError):
        session.request("PATCH", "/v2/a/b/blobs/uploads/1")
    assert len(seen) == 2


def test_backoff_is_exponential_and_capped() -> None:
    session = HttpSession("http://r", backoff=0.5, max_backoff=3)
    assert [session.delay(n) for n in range(4)] == [0.5, 1.0, 2.0, 3.0]


def test_client_sends_token_and_maps_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer sekret"
        return _error(404, "NAME_UNKNOWN", "repository acme/x does not exist")

    client = Client("http://r", "sekret", transport=httpx.MockTransport(handler))
    with client, pytest.raises(NotFound, match="acme/x"):
        client.tags("acme/x")
