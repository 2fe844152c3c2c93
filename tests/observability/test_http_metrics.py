"""Label hygiene of the HTTP metrics: bounded methods, blob bytes of successful transfers only.

In-process (FastAPI's TestClient): the middleware under test is the app's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from peftreg.registry.app import build_services, create_app
from peftreg.registry.settings import Settings
from tests.integration.oci_helpers import digest_of, push_blob
from tests.observability.test_metrics import parse, value

REPO = "acme/labels"
BLOB_ROUTE = "/v2/{name}/blobs/{digest}"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    services = build_services(Settings(home=tmp_path / "home", embedded_worker=False))
    try:
        with TestClient(create_app(services.settings, services)) as test_client:
            yield test_client
    finally:
        services.engine.dispose()


def test_unknown_methods_share_one_label(client: TestClient) -> None:
    for method in ("BREW", "PROPFIND", "get-ish"):
        assert client.request(method, "/healthz").status_code == 405
    text = client.get("/metrics").text
    samples = parse(text)
    assert value(samples, "http_requests_total", method="OTHER", route="/healthz", status="405")
    assert value(samples, "http_requests_total", method="GET", route="/healthz", status="405") == 0
    for method in ("BREW", "PROPFIND", "get-ish", "GET-ISH"):
        assert f'method="{method}"' not in text


def test_blob_bytes_count_successful_transfers_only(client: TestClient) -> None:
    data = b"counted once, when it was accepted" * 30
    assert push_blob(client, REPO, data).status_code == 201
    # Refused: the body does not hash to the digest claimed.
    refused = client.post(
        f"/v2/{REPO}/blobs/uploads/", params={"digest": digest_of(b"other")}, content=data
    )
    assert refused.status_code == 400
    # Error documents are not blob bytes.
    assert client.get(f"/v2/{REPO}/blobs/{digest_of(b'absent')}").status_code == 404
    assert client.get(f"/v2/{REPO}/blobs/{digest_of(data)}").content == data
    samples = parse(client.get("/metrics").text)
    assert value(samples, "blob_bytes_total", direction="in") == len(data)
    assert value(samples, "blob_bytes_total", direction="out") == len(data)
    not_found = {"method": "GET", "route": BLOB_ROUTE, "status": "404"}
    assert value(samples, "http_requests_total", **not_found) == 1
