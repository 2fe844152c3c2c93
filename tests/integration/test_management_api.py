"""The JSON management API under `/api/v1` of a real `peftreg serve` process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.fixtures.server import RegistryProcess
from tests.integration.test_oci_api import (
    assert_oci_error,
    manifest_bytes,
    push_blob,
    push_manifest,
    put_manifest,
    sha256,
)

ADAPTER = "application/vnd.example.adapter.v1"  # opaque: not validated as a peftreg adapter
BASE = "application/vnd.example.base.v1"  # opaque: not validated as a peftreg base
# Not the adapter config type: that one is validated as an AdapterConfig at push.
CONFIG_TYPE = "application/vnd.example.adapter.config.v1+json"


@pytest.fixture
def client(registry_server: RegistryProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry_server.url, timeout=60) as http:
        yield http


def admin_client(server: RegistryProcess) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )


def all_pages(client: httpx.Client, path: str, params: dict[str, Any]) -> list[list[Any]]:
    """Follow `next_cursor` to the end; returns the items of each page."""
    pages: list[list[Any]] = []
    cursor: str | None = None
    while True:
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        response = client.get(path, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "cursor pagination does not end"


def test_repository_list_search_and_cursor(client: httpx.Client) -> None:
    names = [f"acme/bot-{i}" for i in range(5)] + ["other/thing", "acme/nlp/deep-bot"]
    for name in names:
        push_blob(client, name, name.encode())
    push_manifest(client, "acme/bot-0", "prod")

    pages = all_pages(client, "/api/v1/repositories", {"limit": 2})
    assert [len(page) for page in pages] == [2, 2, 2, 1]
    listed = [item["name"] for page in pages for item in page]
    assert listed == sorted(names)

    by_name = {item["name"]: item for page in pages for item in page}
    assert by_name["acme/bot-0"]["versions"] == 1
    assert by_name["acme/bot-0"]["tags"] == 1
    assert by_name["acme/bot-1"]["versions"] == 0
    assert by_name["acme/bot-0"]["immutable_tags"] == ["v*"]

    found = all_pages(client, "/api/v1/repositories", {"q": "bot", "limit": 3})
    assert [item["name"] for page in found for item in page] == sorted(
        name for name in names if "bot" in name
    )
    assert [item["name"] for item in client.get("/api/v1/repositories?q=nlp").json()["items"]] == [
        "acme/nlp/deep-bot"
    ]
    assert client.get("/api/v1/repositories?q=zzz").json() == {"items": [], "next_cursor": None}

    assert_oci_error(client.get("/api/v1/repositories?cursor=%%%"), 400, "INVALID_REQUEST")
    assert_oci_error(client.get("/api/v1/repositories?limit=0"), 400, "INVALID_REQUEST")


def test_versions_filters_and_cursor(client: httpx.Client) -> None:
    adapters = [
        push_manifest(
            client,
            "acme/filters",
            f"a{i}",
            layers=[f"adapter {i}".encode()],
            artifact_type=ADAPTER,
            annotations={"base": "llama" if i % 2 == 0 else "mistral", "rank": str(i)},
        )
        for i in range(5)
    ]
    base = push_manifest(
        client,
        "acme/filters",
        "base",
        layers=[b"base"],
        artifact_type=BASE,
        annotations={"base": "llama"},
    )
    elsewhere = push_manifest(
        client,
        "other/filters",
        "x",
        layers=[b"e"],
        artifact_type=ADAPTER,
        annotations={"base": "llama"},
    )

    pages = all_pages(
        client, "/api/v1/repositories/acme/filters/versions", {"artifact_type": ADAPTER, "limit": 2}
    )
    assert [len(page) for page in pages] == [2, 2, 1]
    items = [item for page in pages for item in page]
    # newest first
    assert [item["digest"] for item in items] == list(reversed(adapters))
    assert {item["artifact_type"] for item in items} == {ADAPTER}
    assert all(item["repository"] == "acme/filters" for item in items)
    assert items[0]["tags"] == ["a4"]
    assert items[0]["pushed_by"] == "anonymous"

    llama = client.get(
        "/api/v1/repositories/acme/filters/versions", params={"annotation": "base=llama"}
    ).json()["items"]
    assert {item["digest"] for item in llama} == {adapters[0], adapters[2], adapters[4], base}

    both = client.get(
        "/api/v1/repositories/acme/filters/versions",
        params=[("annotation", "base=llama"), ("annotation", "rank=2"), ("artifact_type", ADAPTER)],
    ).json()["items"]
    assert [item["digest"] for item in both] == [adapters[2]]

    everywhere = all_pages(
        client,
        "/api/v1/versions",
        {"artifact_type": ADAPTER, "annotation": "base=llama", "limit": 1},
    )
    digests = [item["digest"] for page in everywhere for item in page]
    assert digests == [elsewhere, adapters[4], adapters[2], adapters[0]]

    assert_oci_error(
        client.get("/api/v1/versions", params={"annotation": "no-equals"}), 400, "INVALID_REQUEST"
    )
    assert_oci_error(client.get("/api/v1/repositories/acme/none/versions"), 404, "NAME_UNKNOWN")


def test_version_detail_decodes_manifest_and_config(client: httpx.Client) -> None:
    config = json.dumps({"base_model": "llama-3-8b", "rank": 16, "alpha": 32}).encode()
    digest = push_manifest(
        client,
        "acme/detail",
        "v1",
        artifact_type=ADAPTER,
        config=config,
        config_type=CONFIG_TYPE,
        layers=[b"adapter weights"],
        annotations={"org.opencontainers.image.title": "support-bot"},
    )

    for reference in ("v1", digest):
        response = client.get(f"/api/v1/repositories/acme/detail/versions/{reference}")
        assert response.status_code == 200, response.text
        detail = response.json()
        assert detail["digest"] == digest
        assert detail["tags"] == ["v1"]
        assert detail["artifact_type"] == ADAPTER
        assert detail["annotations"] == {"org.opencontainers.image.title": "support-bot"}
        assert detail["manifest"]["config"]["digest"] == sha256(config)
        assert detail["manifest"]["layers"][0]["size"] == len(b"adapter weights")
        assert detail["config"] == {"base_model": "llama-3-8b", "rank": 16, "alpha": 32}

    assert_oci_error(
        client.get("/api/v1/repositories/acme/detail/versions/nope"), 404, "MANIFEST_UNKNOWN"
    )


def test_tag_history_records_moves(client: httpx.Client) -> None:
    first = push_manifest(client, "acme/history", "prod", layers=[b"one"])
    second = push_manifest(client, "acme/history", "prod", layers=[b"two"])
    # re-pushing the current digest is not a move
    content = client.get(f"/v2/acme/history/manifests/{second}").content
    assert put_manifest(client, "acme/history", "prod", content).status_code == 201
    assert client.delete("/v2/acme/history/manifests/prod").status_code == 202

    response = client.get("/api/v1/repositories/acme/history/tags/prod/history")
    assert response.status_code == 200
    events = response.json()
    assert [(e["from_digest"], e["to_digest"]) for e in events] == [
        (None, first),
        (first, second),
        (second, None),
    ]
    assert {e["actor"] for e in events} == {"anonymous"}
    assert all(e["tag"] == "prod" for e in events)

    assert client.get("/api/v1/repositories/acme/history/tags").json() == []


def test_tags_listing_shows_immutability(client: httpx.Client) -> None:
    digest = push_manifest(client, "acme/taglist", "v1.0")
    content = client.get(f"/v2/acme/taglist/manifests/{digest}").content
    put_manifest(client, "acme/taglist", "staging", content)
    tags = client.get("/api/v1/repositories/acme/taglist/tags").json()
    assert [(t["name"], t["digest"], t["immutable"]) for t in tags] == [
        ("staging", digest, False),
        ("v1.0", digest, True),
    ]


def test_policy_change_makes_tags_immutable(client: httpx.Client) -> None:
    push_manifest(client, "acme/policy", "prod", layers=[b"one"])
    updated = client.put(
        "/api/v1/repositories/acme/policy/policy", json={"immutable_tags": ["prod", "v*"]}
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["immutable_tags"] == ["prod", "v*"]
    other = manifest_bytes(client, "acme/policy", layers=[b"two"])
    assert_oci_error(put_manifest(client, "acme/policy", "prod", other), 409, "TAG_IMMUTABLE")


def test_delete_version_refused_while_tagged_unless_forced(client: httpx.Client) -> None:
    digest = push_manifest(client, "acme/remove", "v1")
    content = client.get(f"/v2/acme/remove/manifests/{digest}").content
    put_manifest(client, "acme/remove", "prod", content)

    refused = client.delete(f"/api/v1/repositories/acme/remove/versions/{digest}")
    error = assert_oci_error(refused, 409, "VERSION_IN_USE")
    assert error["detail"]["tags"] == ["prod", "v1"]
    assert client.head(f"/v2/acme/remove/manifests/{digest}").status_code == 200

    # Forcing does not override the immutable `v1`: the policy must change first.
    immutable = client.delete(
        f"/api/v1/repositories/acme/remove/versions/{digest}", params={"force": "true"}
    )
    assert assert_oci_error(immutable, 409, "TAG_IMMUTABLE")["detail"]["tags"] == ["v1"]
    assert client.head("/v2/acme/remove/manifests/v1").status_code == 200
    policy = client.put(
        "/api/v1/repositories/acme/remove/policy", json={"immutable_tags": ["release-*"]}
    )
    assert policy.status_code == 200, policy.text

    forced = client.delete(
        f"/api/v1/repositories/acme/remove/versions/{digest}", params={"force": "true"}
    )
    assert forced.status_code == 200, forced.text
    body = forced.json()
    assert body["digest"] == digest
    assert sorted(body["tags_removed"]) == ["prod", "v1"]

    assert client.head(f"/v2/acme/remove/manifests/{digest}").status_code == 404
    assert client.head("/v2/acme/remove/manifests/v1").status_code == 404
    assert client.get("/v2/acme/remove/tags/list").json()["tags"] == []
    assert client.get("/api/v1/repositories/acme/remove/versions").json()["items"] == []
    history = client.get("/api/v1/repositories/acme/remove/tags/v1/history").json()
    assert history[-1]["from_digest"] == digest
    assert history[-1]["to_digest"] is None


def test_tokens_lifecycle_on_secured_server(secured_server: RegistryProcess) -> None:
    url = secured_server.url
    with admin_client(secured_server) as admin:
        assert_oci_error(httpx.get(f"{url}/api/v1/tokens"), 401, "UNAUTHORIZED")

        created = admin.post(
            "/api/v1/tokens",
            json={"name": "ci", "grants": [{"pattern": "acme/*", "scope": "write"}]},
        )
        assert created.status_code == 201, created.text
        issued = created.json()
        secret, token_id = issued["token"], issued["id"]
        assert issued["name"] == "ci"
        assert issued["grants"] == [{"pattern": "acme/*", "scope": "write"}]

        listed = admin.get("/api/v1/tokens").json()
        assert [(t["id"], t["name"], t["revoked_at"]) for t in listed] == [(token_id, "ci", None)]
        assert all("token" not in t and secret not in json.dumps(t) for t in listed)
        assert listed[0]["created_by"] == "admin"

        bearer = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=url, timeout=60, headers=bearer) as ci:
            push_blob(ci, "acme/by-token", b"pushed with a scoped token")
            # within its grant it writes; outside it is denied; it is not an admin
            denied = ci.post(
                "/v2/other/repo/blobs/uploads/", params={"digest": sha256(b"x")}, content=b"x"
            )
            assert_oci_error(denied, 403, "DENIED")
            assert_oci_error(ci.get("/api/v1/tokens"), 403, "DENIED")
            assert ci.get("/v2/").status_code == 200
        with httpx.Client(base_url=url, timeout=60, auth=("robot", secret)) as basic:
            assert (
                basic.get(
                    f"/v2/acme/by-token/blobs/{sha256(b'pushed with a scoped token')}"
                ).status_code
                == 200
            )

        revoked = admin.delete(f"/api/v1/tokens/{token_id}")
        assert revoked.status_code == 200
        assert revoked.json()["revoked_at"] is not None
        assert admin.get("/api/v1/tokens").json()[0]["revoked_at"] is not None
        assert_oci_error(admin.delete("/api/v1/tokens/no-such-token"), 404, "TOKEN_UNKNOWN")

        after = httpx.get(f"{url}/v2/acme/by-token/tags/list", headers=bearer)
        assert_oci_error(after, 401, "UNAUTHORIZED")
        assert_oci_error(
            httpx.get(f"{url}/v2/", headers={"Authorization": "Bearer not-a-real-token"}),
            401,
            "UNAUTHORIZED",
        )

        audit = admin.get("/api/v1/audit")
        assert audit.status_code == 200
        events = audit.json()
        actions = [(e["action"], e["actor"], e["target"]) for e in events]
        assert ("token.create", "admin", token_id) in actions
        assert ("token.revoke", "admin", token_id) in actions
        upload = next(e for e in events if e["action"] == "blob.upload")
        assert upload["actor"] == "token:ci"
        assert upload["repository"] == "acme/by-token"
        assert upload["target"] == sha256(b"pushed with a scoped token")
        assert all(e["request_id"] for e in events)
        # newest first
        assert events[0]["action"] == "token.revoke"


def test_audit_log_records_writes(client: httpx.Client) -> None:
    digest = push_manifest(client, "acme/audited", "prod")
    content = client.get(f"/v2/acme/audited/manifests/{digest}").content
    assert client.delete("/v2/acme/audited/manifests/prod").status_code == 202
    assert put_manifest(client, "acme/audited", digest, content).status_code == 201
    push_blob(client, "other/unrelated", b"elsewhere")

    events = client.get("/api/v1/audit", params={"repository": "acme/audited"}).json()
    actions = {(e["action"], e["target"]) for e in events}
    assert ("manifest.put", digest) in actions
    assert ("tag.move", "prod") in actions
    assert ("tag.delete", "prod") in actions
    assert sum(1 for e in events if e["action"] == "blob.upload") == 2
    assert all(e["repository"] == "acme/audited" for e in events)
    tag_delete = next(e for e in events if e["action"] == "tag.delete")
    assert tag_delete["detail"] == {"from": digest, "to": None}

    limited = client.get("/api/v1/audit", params={"limit": 2}).json()
    assert len(limited) == 2
    assert limited[0]["repository"] == "other/unrelated"


def test_openapi_lists_management_paths(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for expected in (
        "/api/v1/repositories",
        "/api/v1/versions",
        "/api/v1/repositories/{name}/versions",
        "/api/v1/repositories/{name}/versions/{reference}",
        "/api/v1/repositories/{name}/tags/{tag}/history",
        "/api/v1/repositories/{name}/policy",
        "/api/v1/tokens",
        "/api/v1/tokens/{token_id}",
        "/api/v1/audit",
    ):
        assert expected in paths, sorted(paths)
    assert "delete" in paths["/api/v1/repositories/{name}/versions/{reference}"]
    assert "post" in paths["/api/v1/tokens"]


def test_management_errors_use_oci_shape(client: httpx.Client) -> None:
    response = client.get("/api/v1/repositories/BAD/versions")
    assert_oci_error(response, 400, "NAME_INVALID")
    assert response.json()["request_id"] == response.headers["X-Request-Id"]
    bad_token = client.post("/api/v1/tokens", json={"name": "x", "grants": []})
    assert_oci_error(bad_token, 400, "INVALID_REQUEST")
