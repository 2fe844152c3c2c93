"""Every route of the app against four principals on a registry that needs tokens.

Principals: anonymous, a `read` token for `acme/*`, a `write` token for
`other/*`, and the bootstrap administrator. The target repository is
`acme/bot`, seeded by the administrator. Every refused request must be
refused the right way (401 with a challenge for anonymous callers, 403
DENIED for authenticated ones) and must change nothing; every allowed one
must succeed. A coverage check fails when the app grows a route that the
matrix does not exercise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from peftreg.registry.app import create_app
from peftreg.registry.settings import Settings
from peftreg.sdk.client import Client
from tests.conftest import ADMIN_TOKEN
from tests.fixtures.server import RegistryProcess
from tests.integration.oci_helpers import (
    bearer,
    digest_of,
    error_codes,
    make_artifact,
    push_artifact,
    push_blob,
    push_manifest,
)
from tests.jobs.artifacts import push_base_and_adapter

REPO = "acme/bot"
SOURCE_REPO = "acme/src"
JOB_REPO = "acme/models"  # adapters and their export jobs; needs as on REPO (acme/*)

# What a case needs on `acme/bot` (or globally).
PUBLIC = "public"  # probes and API docs: anyone
AUTHENTICATED = "authenticated"  # any valid token; results filtered by grants
READ, WRITE, ADMIN = "read", "write", "admin"  # scopes on acme/bot
GLOBAL_ADMIN = "global-admin"

PRINCIPALS = ("anonymous", "read-acme", "write-other", "admin")
GRANTED: dict[str, set[str]] = {
    "anonymous": {PUBLIC},
    "read-acme": {PUBLIC, AUTHENTICATED, READ},
    "write-other": {PUBLIC, AUTHENTICATED},
    "admin": {PUBLIC, AUTHENTICATED, READ, WRITE, ADMIN, GLOBAL_ADMIN},
}


@dataclass(frozen=True)
class Case:
    method: str
    route: str  # the app's route template, `{name:path}` written `{name}`
    path: str
    need: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    json: Any = None

    def send(self, client: httpx.Client) -> httpx.Response:
        return client.request(
            self.method,
            self.path,
            params=self.params,
            headers=self.headers,
            content=self.content,
            json=self.json,
        )

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.params or ''}"


@dataclass
class Seed:
    """Identifiers of what the administrator seeded."""

    layer: str
    spare_blob: str
    source_only_blob: str
    new_blob: bytes
    m1: str  # tagged prod, canary, v1
    m2: str  # untagged, target of DELETE manifest by digest
    m3: str  # untagged, target of DELETE version
    m4: bytes  # a manifest nobody has pushed yet
    session_a: str  # holds b"hello"
    session_b: str  # empty
    session_c: str  # empty
    spare_token_id: str
    tokens: dict[str, str]
    job_id: str = "job_none"  # an export job on JOB_REPO, queued (no worker runs)


def _session_path(location: str) -> str:
    return httpx.URL(location).path


def seed(client: httpx.Client) -> Seed:
    layer = b"layer bytes of acme/bot" * 100
    base = make_artifact(layer, name="bot")
    m1 = push_artifact(client, REPO, "prod", base)
    for tag in ("canary", "v1"):
        assert push_manifest(client, REPO, tag, base.manifest).status_code == 201
    m2_artifact = make_artifact(layer, name="bot-2")
    m3_artifact = make_artifact(layer, name="bot-3")
    for artifact in (m2_artifact, m3_artifact):
        push_artifact(client, REPO, "scratch", artifact)
    # Leave m2 and m3 untagged: `scratch` goes with an untag.
    assert client.delete(f"/v2/{REPO}/manifests/scratch").status_code == 202
    spare = b"a blob to delete"
    assert push_blob(client, REPO, spare).status_code == 201
    source_only = b"only in acme/src"
    assert push_blob(client, SOURCE_REPO, source_only).status_code == 201

    sessions = []
    for _ in range(3):
        started = client.post(f"/v2/{REPO}/blobs/uploads/")
        assert started.status_code == 202, started.text
        sessions.append(_session_path(started.headers["Location"]))
    patched = client.patch(sessions[0], content=b"hello", headers={"Content-Range": "0-4"})
    assert patched.status_code == 202, patched.text

    tokens = {}
    token_ids = {}
    for label, grant in (
        ("read-acme", {"pattern": "acme/*", "scope": "read"}),
        ("write-other", {"pattern": "other/*", "scope": "write"}),
        ("spare", {"pattern": "*", "scope": "read"}),
    ):
        response = client.post("/api/v1/tokens", json={"name": label, "grants": [grant]})
        assert response.status_code == 201, response.text
        tokens[label] = response.json()["token"]
        token_ids[label] = response.json()["id"]

    m4_artifact = make_artifact(layer, name="bot-4")
    assert push_blob(client, REPO, m4_artifact.config).status_code == 201
    m4 = m4_artifact.manifest
    return Seed(
        layer=digest_of(layer),
        spare_blob=digest_of(spare),
        source_only_blob=digest_of(source_only),
        new_blob=b"a brand new blob",
        m1=m1,
        m2=m2_artifact.manifest_digest,
        m3=m3_artifact.manifest_digest,
        m4=m4,
        session_a=sessions[0],
        session_b=sessions[1],
        session_c=sessions[2],
        spare_token_id=token_ids["spare"],
        tokens=tokens,
    )


def matrix(s: Seed) -> list[Case]:
    """Every route, in an order in which the administrator's calls all succeed."""
    v2 = f"/v2/{REPO}"
    api = f"/api/v1/repositories/{REPO}"
    blob_route = "/v2/{name}/blobs/{digest}"
    uploads_route = "/v2/{name}/blobs/uploads/"
    session_route = "/v2/{name}/blobs/uploads/{upload_id}"
    manifest_route = "/v2/{name}/manifests/{reference}"
    hello_world = digest_of(b"hello world")
    cases = [
        Case("GET", "/healthz", "/healthz", PUBLIC),
        Case("GET", "/readyz", "/readyz", PUBLIC),
        Case("GET", "/metrics", "/metrics", PUBLIC),  # unauthenticated by design, like probes
        Case("GET", "/openapi.json", "/openapi.json", PUBLIC),
        Case("HEAD", "/openapi.json", "/openapi.json", PUBLIC),
        Case("GET", "/docs", "/docs", PUBLIC),
        Case("HEAD", "/docs", "/docs", PUBLIC),
        Case("GET", "/docs/oauth2-redirect", "/docs/oauth2-redirect", PUBLIC),
        Case("HEAD", "/docs/oauth2-redirect", "/docs/oauth2-redirect", PUBLIC),
        Case("GET", "/redoc", "/redoc", PUBLIC),
        Case("HEAD", "/redoc", "/redoc", PUBLIC),
        Case("GET", "/token", "/token", PUBLIC, params={"scope": f"repository:{REPO}:pull"}),
        Case(
            "POST",
            "/token",
            "/token",
            PUBLIC,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            content=f"grant_type=password&username=u&password={ADMIN_TOKEN}".encode(),
        ),
        Case("GET", "/schemas/{name}", "/schemas/adapter.config.v1.json", PUBLIC),
        Case("GET", "/v2/", "/v2/", AUTHENTICATED),
        Case("GET", "/v2/_catalog", "/v2/_catalog", AUTHENTICATED),
        Case("GET", blob_route, f"{v2}/blobs/{s.layer}", READ),
        Case("HEAD", blob_route, f"{v2}/blobs/{s.layer}", READ),
        Case("DELETE", blob_route, f"{v2}/blobs/{s.spare_blob}", ADMIN),
        Case("POST", uploads_route, f"{v2}/blobs/uploads/", WRITE),
        Case(
            "POST",
            uploads_route,
            f"{v2}/blobs/uploads/",
            WRITE,
            params={"digest": digest_of(s.new_blob)},
            content=s.new_blob,
        ),
        Case(
            "POST",
            uploads_route,
            f"{v2}/blobs/uploads/",
            WRITE,
            params={"mount": s.source_only_blob, "from": SOURCE_REPO},
        ),
        Case("GET", session_route, s.session_a, WRITE),
        Case(
            "PATCH",
            session_route,
            s.session_b,
            WRITE,
            content=b"abc",
            headers={"Content-Range": "0-2"},
        ),
        Case(
            "PUT",
            session_route,
            s.session_a,
            WRITE,
            params={"digest": hello_world},
            content=b" world",
            headers={"Content-Range": "5-10"},
        ),
        Case("DELETE", session_route, s.session_c, WRITE),
        Case(
            "PUT",
            manifest_route,
            f"{v2}/manifests/prod",
            WRITE,
            content=s.m4,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        ),
        Case("GET", manifest_route, f"{v2}/manifests/prod", READ),
        Case("HEAD", manifest_route, f"{v2}/manifests/prod", READ),
        Case("DELETE", manifest_route, f"{v2}/manifests/canary", WRITE),
        Case("DELETE", manifest_route, f"{v2}/manifests/{s.m2}", ADMIN),
        Case("GET", "/v2/{name}/tags/list", f"{v2}/tags/list", READ),
        Case("GET", "/v2/{name}/referrers/{digest}", f"{v2}/referrers/{s.m1}", READ),
        Case("GET", "/api/v1/repositories", "/api/v1/repositories", AUTHENTICATED),
        Case("GET", "/api/v1/versions", "/api/v1/versions", AUTHENTICATED),
        Case("GET", "/api/v1/repositories/{name}/versions", f"{api}/versions", READ),
        Case(
            "GET",
            "/api/v1/repositories/{name}/versions/{reference}",
            f"{api}/versions/prod",
            READ,
        ),
        Case(
            "DELETE",
            "/api/v1/repositories/{name}/versions/{reference}",
            f"{api}/versions/{s.m3}",
            ADMIN,
        ),
        Case("GET", "/api/v1/repositories/{name}/tags", f"{api}/tags", READ),
        Case(
            "GET",
            "/api/v1/repositories/{name}/tags/{tag}/history",
            f"{api}/tags/prod/history",
            READ,
        ),
        Case(
            "GET",
            "/api/v1/repositories/{name}/tags/{tag}/watch",
            f"{api}/tags/prod/watch",
            READ,
            params={"timeout": "0"},
        ),
        Case(
            "PUT",
            "/api/v1/repositories/{name}/policy",
            f"{api}/policy",
            ADMIN,
            json={"immutable_tags": ["v*", "release-*"]},
        ),
        Case(
            "POST",
            "/api/v1/tokens",
            "/api/v1/tokens",
            GLOBAL_ADMIN,
            json={"name": "escalated", "grants": [{"pattern": "*", "scope": "admin"}]},
        ),
        Case("GET", "/api/v1/tokens", "/api/v1/tokens", GLOBAL_ADMIN),
        Case(
            "DELETE",
            "/api/v1/tokens/{token_id}",
            f"/api/v1/tokens/{s.spare_token_id}",
            GLOBAL_ADMIN,
        ),
        Case("GET", "/api/v1/audit", "/api/v1/audit", GLOBAL_ADMIN),
        Case(
            "POST",
            "/api/v1/exports",
            "/api/v1/exports",
            WRITE,
            json={
                "adapters": [{"reference": f"{JOB_REPO}:v1"}],
                "base": "acme/base:seed0",
                "dtype": "float16",
            },
        ),
        Case("GET", "/api/v1/jobs", "/api/v1/jobs", AUTHENTICATED),
        Case("GET", "/api/v1/jobs/{job_id}", f"/api/v1/jobs/{s.job_id}", READ),
        Case("GET", "/api/v1/jobs/{job_id}/logs", f"/api/v1/jobs/{s.job_id}/logs", READ),
        Case("POST", "/api/v1/jobs/{job_id}/cancel", f"/api/v1/jobs/{s.job_id}/cancel", WRITE),
    ]
    return cases


# The web UI's pages authorize through the same principals (a session holding a token);
# tests/browser/test_ui.py checks a read-only token there (hidden controls, 403 on writes).
UI_PREFIX = "/ui"


def app_operations(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every API route the app serves, from its router and its OpenAPI."""
    settings = Settings(home=tmp_path / "unused-home")
    app = create_app(settings, services=SimpleNamespace())  # type: ignore[arg-type]
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                context = getattr(route, "include_context", None)
                walk(included.routes, prefix + getattr(context, "prefix", ""))
            elif hasattr(route, "path") and getattr(route, "methods", None):
                path = (prefix + route.path).replace(":path}", "}")
                found.update((method, path) for method in route.methods)
            elif hasattr(route, "routes"):
                walk(route.routes, prefix + getattr(route, "path", ""))

    walk(list(app.routes), "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate operation ids of GET+HEAD routes
        schema = app.openapi()
    for path, operations in schema["paths"].items():
        found.update((method.upper(), path) for method in operations)
    return {(method, path) for method, path in found if not path.startswith(UI_PREFIX)}


@pytest.fixture
def principals(
    secured_server: RegistryProcess, tmp_path: Path
) -> Iterator[tuple[dict[str, httpx.Client], Seed]]:
    admin = httpx.Client(base_url=secured_server.url, headers=bearer(ADMIN_TOKEN), timeout=30)
    seeded = seed(admin)
    sdk = Client(secured_server.url, ADMIN_TOKEN, cache=tmp_path / "cache")
    push_base_and_adapter(sdk, tmp_path, repository=JOB_REPO)
    job, _ = sdk.export(f"{JOB_REPO}:v1", "acme/base:seed0")
    seeded = replace(seeded, job_id=job.id)
    clients = {
        "anonymous": httpx.Client(base_url=secured_server.url, timeout=30),
        "read-acme": httpx.Client(
            base_url=secured_server.url, headers=bearer(seeded.tokens["read-acme"]), timeout=30
        ),
        "write-other": httpx.Client(
            base_url=secured_server.url, headers=bearer(seeded.tokens["write-other"]), timeout=30
        ),
        "admin": admin,
    }
    yield clients, seeded
    for client in clients.values():
        client.close()


def snapshot(admin: httpx.Client, s: Seed) -> dict[str, Any]:
    """What a refused request must not change, as the administrator sees it."""
    v2 = f"/v2/{REPO}"

    def status(path: str, method: str = "HEAD") -> int:
        return admin.request(method, path).status_code

    tokens = admin.get("/api/v1/tokens").json()
    repositories = admin.get("/api/v1/repositories").json()["items"]
    audit = admin.get("/api/v1/audit", params={"limit": 1000}).json()
    return {
        "prod": admin.head(f"{v2}/manifests/prod").headers.get("Docker-Content-Digest"),
        "tags": admin.get(f"{v2}/tags/list").json()["tags"],
        "spare blob": status(f"{v2}/blobs/{s.spare_blob}"),
        "new blob": status(f"{v2}/blobs/{digest_of(s.new_blob)}"),
        "mounted blob": status(f"{v2}/blobs/{s.source_only_blob}"),
        "hello world blob": status(f"{v2}/blobs/{digest_of(b'hello world')}"),
        "abc blob": status(f"{v2}/blobs/{digest_of(b'abc')}"),
        "session a": admin.get(s.session_a).headers.get("Range"),
        "session b": admin.get(s.session_b).headers.get("Range"),
        "session c": status(s.session_c, "GET"),
        "m2": status(f"{v2}/manifests/{s.m2}"),
        "m3": status(f"{v2}/manifests/{s.m3}"),
        "m4": status(f"{v2}/manifests/{digest_of(s.m4)}"),
        "tokens": sorted((t["id"], t["name"], t["revoked_at"]) for t in tokens),
        "repositories": sorted((r["name"], tuple(r["immutable_tags"])) for r in repositories),
        "audit": len(audit),
        "audit actors": sorted({event["actor"] for event in audit}),
        "jobs": sorted((job["id"], job["status"]) for job in admin.get("/api/v1/jobs").json()),
    }


def assert_refused(principal: str, case: Case, response: httpx.Response) -> None:
    if principal == "anonymous":
        assert response.status_code == 401, f"{principal}: {case} -> {response.status_code}"
        assert response.headers.get("WWW-Authenticate", "").startswith("Bearer realm="), str(case)
        if case.method != "HEAD":
            assert error_codes(response) == ["UNAUTHORIZED"], f"{case}: {response.text}"
    else:
        assert response.status_code == 403, f"{principal}: {case} -> {response.status_code}"
        if case.method != "HEAD":
            assert error_codes(response) == ["DENIED"], f"{case}: {response.text}"


def test_matrix_covers_every_route(tmp_path: Path) -> None:
    dummy = Seed("d", "d", "d", b"", "d", "d", "d", b"", "/s", "/s", "/s", "t", {})
    covered = {(case.method, case.route) for case in matrix(dummy)}
    served = app_operations(tmp_path)
    assert served - covered == set(), "routes missing from the authorization matrix"
    assert covered - served == set(), "matrix names routes the app does not serve"


def test_no_unauthorized_request_succeeds(
    principals: tuple[dict[str, httpx.Client], Seed],
) -> None:
    clients, s = principals
    admin = clients["admin"]
    cases = matrix(s)
    before = snapshot(admin, s)
    assert before["prod"] == s.m1
    assert before["tags"] == ["canary", "prod", "v1"]

    for principal in ("anonymous", "read-acme", "write-other"):
        client = clients[principal]
        for case in cases:
            response = case.send(client)
            if case.need in GRANTED[principal]:
                assert response.is_success, f"{principal}: {case} -> {response.text}"
                # Allowed listings must not leak what the caller may not read.
                if principal == "write-other" and case.method != "HEAD":
                    assert REPO not in response.text, f"{case} leaks {REPO}"
                    assert SOURCE_REPO not in response.text, f"{case} leaks {SOURCE_REPO}"
            else:
                assert_refused(principal, case, response)
        assert snapshot(admin, s) == before, f"a refused request of {principal} changed state"

    # A write token may not mount from a repository it cannot read: it gets
    # a plain upload session instead, and the blob stays out of its repository.
    writer = clients["write-other"]
    mount = writer.post("/v2/other/thief/blobs/uploads/", params={"mount": s.layer, "from": REPO})
    assert mount.status_code == 202, mount.text
    assert admin.head(f"/v2/other/thief/blobs/{s.layer}").status_code == 404
    # Basic auth with a valid token but no grant is still refused.
    basic = httpx.get(f"{admin.base_url}/v2/{REPO}/tags/list", auth=("x", s.tokens["write-other"]))
    assert basic.status_code == 403

    # The administrator may do everything, in this order.
    for case in cases:
        response = case.send(admin)
        assert response.is_success, f"admin: {case} -> {response.status_code} {response.text}"

    after = snapshot(admin, s)
    assert after["prod"] == digest_of(s.m4)
    assert after["tags"] == ["prod", "v1"]
    assert after["spare blob"] == 404
    assert after["new blob"] == after["mounted blob"] == after["hello world blob"] == 200
    assert after["m2"] == after["m3"] == 404
    assert after["audit actors"] == ["admin"]
    spare = next(t for t in admin.get("/api/v1/tokens").json() if t["id"] == s.spare_token_id)
    assert spare["revoked_at"] is not None
    revoked = httpx.get(f"{admin.base_url}/v2/", headers=bearer(s.tokens["spare"]))
    assert revoked.status_code == 401
