"""Hand-made bad requests against a real `peftreg serve`, on SQLite and PostgreSQL.

Each is answered with a 4xx whose OCI error code names the cause, stores
nothing, and leaves the server serving: deeply nested JSON, numbers beyond
what the database holds, a trailing newline after a name, tag or digest,
unsafe layer titles in peftreg's own artifact types, a chunk range that ends
before it starts, and a method no route serves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.postgres import fresh_database, postgres_admin_url
from tests.fixtures.server import start_registry
from tests.integration.oci_helpers import (
    OCI_MANIFEST,
    digest_of,
    error_codes,
    push_blob,
    push_manifest,
)

ADAPTER_ARTIFACT = "application/vnd.peftreg.adapter.v1"
ADAPTER_CONFIG = "application/vnd.peftreg.adapter.config.v1+json"


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp(request.param) / "home"
    if request.param == "sqlite":
        server = start_registry(home)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield http
        server.stop()
        return
    with fresh_database(postgres_admin_url()) as url:
        server = start_registry(home, {"PEFTREG_DATABASE_URL": url, "PEFTREG_AUTO_MIGRATE": "true"})
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield http
        server.stop()


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert error_codes(response) == [code], response.text
    error: dict[str, Any] = response.json()["errors"][0]
    return error


def still_serving(client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.get("/v2/").status_code == 200


def repository_exists(client: httpx.Client, name: str) -> bool:
    response = client.get(f"/v2/{name}/tags/list")
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


def test_deeply_nested_json_is_refused(client: httpx.Client) -> None:
    deep = b"[" * 1000 + b"]" * 1000
    error = refused(push_manifest(client, "acme/deep", "t1", deep), 400, "MANIFEST_INVALID")
    assert "nests deeper than 64 levels" in error["message"]
    # Under Python's recursion limit, but still far deeper than any manifest.
    nested = b'{"a":' * 200 + b"1" + b"}" * 200
    refused(push_manifest(client, "acme/deep", "t1", nested), 400, "MANIFEST_INVALID")
    assert not repository_exists(client, "acme/deep")
    token = client.post(
        "/api/v1/tokens", content=deep, headers={"Content-Type": "application/json"}
    )
    refused(token, 400, "INVALID_REQUEST")
    still_serving(client)


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/api/v1/versions", {"max_rank": "99999999999999999999"}),
        ("/api/v1/versions", {"max_rank": "2147483648"}),  # PostgreSQL's integer + 1
        ("/api/v1/repositories/acme/bot/versions", {"max_rank": "99999999999999999999"}),
        ("/v2/acme/bot/tags/list", {"n": "9223372036854775807"}),
        ("/v2/_catalog", {"n": "99999999999999999999"}),
    ],
)
def test_numbers_beyond_the_database_are_bad_requests(
    client: httpx.Client, path: str, query: dict[str, str]
) -> None:
    (name,) = query
    error = refused(client.get(path, params=query), 400, "INVALID_REQUEST")
    assert error["message"].startswith(f"query.{name}: ")
    still_serving(client)


def test_the_largest_number_the_database_holds_is_a_filter(client: httpx.Client) -> None:
    found = client.get("/api/v1/versions", params={"max_rank": "2147483647", "kind": "lora"})
    assert found.status_code == 200, found.text
    assert found.json()["items"] == []


def test_a_trailing_newline_is_no_part_of_a_name_tag_or_digest(client: httpx.Client) -> None:
    config = json.dumps({"name": "nl"}).encode()
    assert push_blob(client, "acme/newline", config).status_code == 201
    layer = b"layer of acme/newline"
    assert push_blob(client, "acme/newline", layer).status_code == 201
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.thing.v1",
        "config": {
            "mediaType": "application/json",
            "digest": digest_of(config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": "application/octet-stream", "digest": digest_of(layer), "size": 5}
        ],
    }
    document["layers"][0]["size"] = len(layer)
    manifest = json.dumps(document).encode()

    refused(push_manifest(client, "acme/newline", "prod%0A", manifest), 400, "TAG_INVALID")
    digest = digest_of(manifest)
    refused(push_manifest(client, "acme/newline", f"{digest}%0A", manifest), 400, "DIGEST_INVALID")
    tagged = push_manifest(client, "acme/newline", "prod", manifest)
    assert tagged.status_code == 201, tagged.text
    assert client.get("/v2/acme/newline/tags/list").json()["tags"] == ["prod"]

    refused(client.get(f"/v2/acme/newline/blobs/{digest_of(layer)}%0A"), 400, "DIGEST_INVALID")
    refused(client.get(f"/v2/acme/newline/manifests/{digest}%0A"), 400, "DIGEST_INVALID")
    refused(client.get("/v2/acme/newline/manifests/prod%0A"), 400, "TAG_INVALID")
    # A name never holds a newline: no route matches such a path, so nothing is served.
    refused(client.get("/v2/acme/newline%0A/tags/list"), 404, "NOT_FOUND")
    refused(push_manifest(client, "acme/newline%0A", "prod", manifest), 404, "NOT_FOUND")
    assert client.get(f"/v2/acme/newline/blobs/{digest_of(layer)}").content == layer
    still_serving(client)


def adapter_manifest(client: httpx.Client, repository: str, titles: list[str]) -> bytes:
    config = json.dumps({"kind": "lora"}).encode()
    assert push_blob(client, repository, config).status_code == 201
    layers = []
    for index, title in enumerate(titles):
        data = f"layer {index} of {repository}".encode()
        assert push_blob(client, repository, data).status_code == 201
        layers.append(
            {
                "mediaType": "application/octet-stream",
                "digest": digest_of(data),
                "size": len(data),
                "annotations": {"org.opencontainers.image.title": title},
            }
        )
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ADAPTER_ARTIFACT,
        "config": {"mediaType": ADAPTER_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": layers,
    }
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("titles", "layer", "says"),
    [
        (["README.md", "../escape.txt"], 1, "'../escape.txt'"),
        (["/etc/passwd"], 0, "absolute path"),
        (["a\\b.txt"], 0, "unsafe layer title"),
        (["a\x00b"], 0, "unsafe layer title"),
        (["w.bin", "sub/./x"], 1, "not normal"),
        (["w.bin", "w.bin"], 1, "same title 'w.bin'"),
        (["Adapter.safetensors", "adapter.safetensors"], 1, "ignoring case"),
    ],
)
def test_unsafe_layer_titles_of_peftreg_artifacts_are_refused(
    client: httpx.Client, titles: list[str], layer: int, says: str
) -> None:
    repository = "acme/titles"
    manifest = adapter_manifest(client, repository, titles)
    error = refused(push_manifest(client, repository, "v1", manifest), 422, "LAYER_TITLE_INVALID")
    assert says in error["message"]
    assert error["detail"]["layer"] == layer
    assert error["detail"]["title"] == titles[layer]
    tags = client.get(f"/v2/{repository}/tags/list")
    assert tags.status_code == 404 or tags.json()["tags"] == []
    still_serving(client)


def test_a_chunk_that_ends_before_it_starts_is_refused(client: httpx.Client) -> None:
    started = client.post("/v2/acme/chunks/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    error = refused(
        client.patch(location, content=b"0123456789", headers={"Content-Range": "10-2"}),
        416,
        "RANGE_INVALID",
    )
    assert error["detail"] == {"offset": 0}
    status = client.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-0"  # nothing was written
    data = b"0123456789"
    patched = client.patch(location, content=data, headers={"Content-Range": "0-9"})
    assert patched.status_code == 202, patched.text
    done = client.put(patched.headers["Location"], params={"digest": digest_of(data)})
    assert done.status_code == 201, done.text


def test_a_method_no_route_serves_gets_405_with_allow(client: httpx.Client) -> None:
    response = client.request("TRACE", "/v2/")
    refused(response, 405, "UNSUPPORTED")
    assert response.headers["Allow"] == "GET"
    blob = client.request("PUT", f"/v2/acme/bot/blobs/{digest_of(b'x')}")
    refused(blob, 405, "UNSUPPORTED")
    assert blob.headers["Allow"] == "GET, HEAD, DELETE"
