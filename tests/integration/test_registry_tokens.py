"""The registry token flow (docker/distribution): challenge, `/token`, scoped bearer tokens.

In-process (FastAPI's TestClient) on a registry that needs tokens. Expired
tokens and tokens for another service are signed with the server's own key,
so they are refused for what they say, not for a bad signature.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from peftreg.registry.app import build_services, create_app
from peftreg.registry.auth import registry_tokens
from peftreg.registry.auth.scopes import Grant, Principal
from peftreg.registry.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.integration.oci_helpers import (
    bearer,
    digest_of,
    error_codes,
    make_artifact,
    push_artifact,
    push_blob,
)

KEY = "k" * 48
SERVICE = "testserver"  # the Host header TestClient sends
REPO = "acme/bot"
ADMIN = bearer(ADMIN_TOKEN)


@dataclass(frozen=True)
class Registry:
    http: TestClient  # no credentials unless a request names them
    admin: TestClient
    reader: str  # peftreg token: read on acme/*
    writer: str  # peftreg token: write on acme/bot only
    manifest: str


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    home: Path = tmp_path_factory.mktemp("token-flow")
    settings = Settings(
        home=home,
        anonymous="none",
        admin_token=ADMIN_TOKEN,
        token_signing_key=KEY,
        embedded_worker=False,
    )
    services = build_services(settings)
    try:
        app = create_app(settings, services)
        with TestClient(app) as http, TestClient(app, headers=ADMIN) as admin:
            manifest = push_artifact(admin, REPO, "prod", make_artifact(b"weights"))
            push_artifact(admin, "other/bot", "prod", make_artifact(b"other"))
            issued = {}
            for name, pattern, scope in (("reader", "acme/*", "read"), ("writer", REPO, "write")):
                body = {"name": name, "grants": [{"pattern": pattern, "scope": scope}]}
                response = admin.post("/api/v1/tokens", json=body)
                assert response.status_code == 201, response.text
                issued[name] = response.json()["token"]
            yield Registry(http, admin, issued["reader"], issued["writer"], manifest)
    finally:
        services.engine.dispose()


def challenge_params(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer"
    params = {}
    for part in rest.split('",'):
        key, _, value = part.partition("=")
        params[key.strip()] = value.strip('"')
    return params


def fetch_token(registry: Registry, *scopes: str, auth: tuple[str, str] | None = None) -> str:
    response = registry.http.get(
        "/token", params={"service": SERVICE, "scope": list(scopes)}, auth=auth
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    return str(body["token"])


def claims(token: str) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(token, KEY, algorithms=["HS256"], audience=SERVICE)
    return decoded


def test_anonymous_request_gets_a_bearer_challenge_naming_the_scope(registry: Registry) -> None:
    response = registry.http.get(f"/v2/{REPO}/tags/list")
    assert response.status_code == 401
    assert error_codes(response) == ["UNAUTHORIZED"]
    params = challenge_params(response.headers["WWW-Authenticate"])
    assert params == {
        "realm": "http://testserver/token",
        "service": SERVICE,
        "scope": f"repository:{REPO}:pull",
    }
    upload = registry.http.post(f"/v2/{REPO}/blobs/uploads/")
    scope = challenge_params(upload.headers["WWW-Authenticate"])["scope"]
    assert scope == f"repository:{REPO}:pull,push"


def test_token_carries_only_the_access_its_peftreg_token_grants(registry: Registry) -> None:
    token = fetch_token(
        registry,
        f"repository:{REPO}:pull,push",
        "repository:other/bot:pull",
        auth=("ci", registry.reader),
    )
    assert claims(token)["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]
    assert claims(token)["sub"] == "token:reader"

    ok = registry.http.get(f"/v2/{REPO}/tags/list", headers=bearer(token))
    assert ok.status_code == 200
    assert ok.json()["tags"] == ["prod"]
    # a repository the token does not name, even one the peftreg token could read
    other_acme = registry.http.get("/v2/acme/elsewhere/tags/list", headers=bearer(token))
    assert other_acme.status_code == 403
    refused = registry.http.get("/v2/other/bot/tags/list", headers=bearer(token))
    assert refused.status_code == 403
    # a push with a pull-only token: 403 with a challenge asking for push (RFC 6750)
    assert push_blob(registry.http, REPO, b"x").status_code == 401
    denied = registry.http.post(f"/v2/{REPO}/blobs/uploads/", headers=bearer(token))
    assert denied.status_code == 403
    assert error_codes(denied) == ["DENIED"]
    params = challenge_params(denied.headers["WWW-Authenticate"])
    assert params["scope"] == f"repository:{REPO}:pull,push"
    assert params["error"] == "insufficient_scope"
    assert registry.admin.head(f"/v2/{REPO}/blobs/{digest_of(b'x')}").status_code == 404


def test_token_scope_is_limited_to_what_was_asked(registry: Registry) -> None:
    token = fetch_token(registry, f"repository:{REPO}:pull", auth=("ci", registry.writer))
    assert claims(token)["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]
    response = registry.http.post(
        f"/v2/{REPO}/blobs/uploads/",
        params={"digest": digest_of(b"y")},
        content=b"y",
        headers=bearer(token),
    )
    assert response.status_code == 403
    wider = fetch_token(registry, f"repository:{REPO}:pull,push,*", auth=("ci", registry.writer))
    access = claims(wider)["access"]
    assert access == [{"type": "repository", "name": REPO, "actions": ["pull", "push"]}]
    response = registry.http.post(
        f"/v2/{REPO}/blobs/uploads/",
        params={"digest": digest_of(b"y")},
        content=b"y",
        headers=bearer(wider),
    )
    assert response.status_code == 201, response.text
    # deleting by digest needs admin (`*` or `delete`), which the writer does not hold
    delete = registry.http.delete(
        f"/v2/{REPO}/manifests/{registry.manifest}", headers=bearer(wider)
    )
    assert delete.status_code == 403
    assert challenge_params(delete.headers["WWW-Authenticate"])["scope"] == f"repository:{REPO}:*"


def test_basic_and_plain_bearer_peftreg_tokens_keep_working(registry: Registry) -> None:
    plain = registry.http.get(f"/v2/{REPO}/tags/list", headers=bearer(registry.reader))
    assert plain.status_code == 200
    basic = registry.http.get(f"/v2/{REPO}/tags/list", auth=("anyone", registry.reader))
    assert basic.status_code == 200
    # a bearer peftreg token may also be exchanged at the realm
    response = registry.http.get(
        "/token", params={"scope": f"repository:{REPO}:pull"}, headers=bearer(registry.reader)
    )
    assert claims(response.json()["token"])["access"][0]["name"] == REPO  # type: ignore[index]


def test_oauth2_password_grant(registry: Registry) -> None:
    form = {
        "grant_type": "password",
        "username": "ci",
        "password": registry.reader,
        "service": SERVICE,
        "scope": f"repository:{REPO}:pull,push repository:other/bot:pull",
    }
    response = registry.http.post("/token", data=form)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == f"repository:{REPO}:pull"
    token = response.json()["access_token"]
    assert claims(token)["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]
    assert registry.http.get(f"/v2/{REPO}/tags/list", headers=bearer(token)).status_code == 200
    refresh = registry.http.post("/token", data={"grant_type": "refresh_token"})
    assert refresh.status_code == 400
    wrong = registry.http.post("/token", data={**form, "password": "prt_0_wrong"})
    assert wrong.status_code == 401


def test_refusals_name_their_cause(registry: Registry) -> None:
    wrong = registry.http.get(
        "/token", params={"scope": f"repository:{REPO}:pull"}, auth=("ci", "prt_0_nope")
    )
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer realm=")

    elsewhere = registry.http.get(
        "/token",
        params={"service": "registry.example.com", "scope": f"repository:{REPO}:pull"},
        auth=("ci", registry.reader),
    )
    assert elsewhere.status_code == 400
    assert "registry.example.com" in elsewhere.json()["errors"][0]["message"]

    bad_scope = registry.http.get("/token", params={"scope": "pull"}, auth=("ci", registry.reader))
    assert bad_scope.status_code == 400

    reader = Principal("token:reader", (Grant("acme/*", "read"),))
    access = [registry_tokens.Access("repository", REPO, ("pull",))]

    def signed(service: str, key: str, issued: datetime) -> str:
        token, _ = registry_tokens.issue(
            key=key.encode(),
            service=service,
            principal=reader,
            access=access,
            lifetime=timedelta(minutes=5),
            now=issued,
        )
        return token

    now = datetime.now(UTC)
    cases = {
        "another registry": signed("registry.example.com", KEY, now),
        "expired": signed(SERVICE, KEY, now - timedelta(minutes=10)),
        "invalid registry token": signed(SERVICE, "x" * 48, now),
    }
    for cause, token in cases.items():
        response = registry.http.get(f"/v2/{REPO}/tags/list", headers=bearer(token))
        assert response.status_code == 401, cause
        assert cause in response.json()["errors"][0]["message"], response.text


def test_signing_key_must_be_long_enough() -> None:
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        Settings(token_signing_key="short")


def test_revoking_the_peftreg_token_revokes_its_registry_tokens(registry: Registry) -> None:
    created = registry.admin.post(
        "/api/v1/tokens",
        json={"name": "short", "grants": [{"pattern": "acme/*", "scope": "read"}]},
    ).json()
    token = fetch_token(registry, f"repository:{REPO}:pull", auth=("ci", created["token"]))
    assert registry.http.get(f"/v2/{REPO}/tags/list", headers=bearer(token)).status_code == 200
    revoked = registry.admin.delete(f"/api/v1/tokens/{created['id']}")
    assert revoked.status_code == 200, revoked.text
    response = registry.http.get(f"/v2/{REPO}/tags/list", headers=bearer(token))
    assert response.status_code == 401
    assert "revoked" in response.json()["errors"][0]["message"]


def test_admin_token_exchanged_for_delete_deletes_by_digest(registry: Registry) -> None:
    push_artifact(registry.admin, REPO, "scratch", make_artifact(b"scratch"))
    digest = make_artifact(b"scratch").manifest_digest
    token = fetch_token(registry, f"repository:{REPO}:*", auth=("admin", ADMIN_TOKEN))
    response = registry.http.delete(f"/v2/{REPO}/manifests/{digest}", headers=bearer(token))
    assert response.status_code == 202, response.text
    gone = registry.admin.get(f"/v2/{REPO}/manifests/scratch")
    assert gone.status_code == 404
