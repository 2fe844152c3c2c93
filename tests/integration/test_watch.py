"""The tag long-poll: returns at once when the digest differs, when the tag moves during the
wait (proved to be waiting by the server's `tag_watches_in_flight` gauge), or at the timeout
unchanged; refuses unknown repositories, bad digests and strangers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from peftreg import Client
from tests.conftest import ADMIN_TOKEN
from tests.fixtures.server import RegistryProcess
from tests.integration.oci_helpers import (
    bearer,
    error_codes,
    make_artifact,
    push_artifact,
    push_manifest,
)

REPO = "acme/watched"
MAX_WATCHES = 100  # registry.api.routes.watch.MAX_WATCHES_PER_PRINCIPAL
WATCH = f"/api/v1/repositories/{REPO}/tags/prod/watch"


@pytest.fixture
def http(server: RegistryProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _two_versions(http: httpx.Client, repo: str = REPO) -> tuple[str, str]:
    first = push_artifact(http, repo, "prod", make_artifact(b"one", name=f"{repo}-1"))
    second = push_artifact(http, repo, "next", make_artifact(b"two", name=f"{repo}-2"))
    return first, second


def _move(http: httpx.Client, repo: str, tag: str, name: str, layer: bytes) -> None:
    response = push_manifest(http, repo, tag, make_artifact(layer, name=name).manifest)
    assert response.status_code == 201, response.text


def test_returns_at_once_when_the_digest_differs(http: httpx.Client) -> None:
    first, _second = _two_versions(http)
    started = time.monotonic()
    for known in ("", "sha256:" + "1" * 64):
        response = http.get(WATCH, params={"digest": known, "timeout": 20})
        assert response.status_code == 200, response.text
        assert response.json() == {"tag": "prod", "digest": first, "changed": True}
    assert time.monotonic() - started < 5


def test_times_out_unchanged(http: httpx.Client) -> None:
    first, _second = _two_versions(http)
    started = time.monotonic()
    response = http.get(WATCH, params={"digest": first, "timeout": 1})
    elapsed = time.monotonic() - started
    assert response.json() == {"tag": "prod", "digest": first, "changed": False}
    assert 1.0 <= elapsed < 5


def watches_in_flight(http: httpx.Client) -> float:
    """The server's `tag_watches_in_flight` gauge (long-polls waiting now)."""
    body = http.get("/metrics").text
    for family in text_string_to_metric_families(body):
        if family.name == "tag_watches_in_flight":
            return float(family.samples[0].value)
    raise AssertionError("tag_watches_in_flight is not exposed")


def test_a_move_during_the_wait_ends_it(http: httpx.Client, server: RegistryProcess) -> None:
    """Two callers wait on the same tag (one shared poller); a move by another client ends
    both waits, and their answers come after the move."""
    first, second = _two_versions(http)
    answers: list[tuple[float, httpx.Response]] = []

    def watch() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as watcher:
            response = watcher.get(WATCH, params={"digest": first, "timeout": 30})
            answers.append((time.monotonic(), response))

    threads = [threading.Thread(target=watch) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while watches_in_flight(http) < 2:  # both are waiting on the server now
        assert time.monotonic() < deadline, "the watches never started waiting"
        time.sleep(0.02)
    assert answers == []
    _move(http, REPO, "prod", f"{REPO}-2", b"two")  # another client moves the tag
    moved = time.monotonic()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 2
    for answered, response in answers:
        assert response.json() == {"tag": "prod", "digest": second, "changed": True}
        assert answered >= moved
        assert answered - moved < 10
    assert watches_in_flight(http) == 0


def test_tag_created_and_deleted(http: httpx.Client) -> None:
    repo = "acme/lifecycle"
    _two_versions(http, repo)
    path = f"/api/v1/repositories/{repo}/tags/canary/watch"
    absent = http.get(path, params={"timeout": 0})
    assert absent.json() == {"tag": "canary", "digest": None, "changed": False}
    _move(http, repo, "canary", f"{repo}-2", b"two")
    created = http.get(path, params={"digest": "", "timeout": 5}).json()
    assert created["changed"] is True
    assert created["digest"] is not None
    assert http.delete(f"/v2/{repo}/manifests/canary").status_code == 202
    deleted = http.get(path, params={"digest": created["digest"], "timeout": 5}).json()
    assert deleted == {"tag": "canary", "digest": None, "changed": True}


def test_waits_per_principal_are_capped(http: httpx.Client, server: RegistryProcess) -> None:
    """The 101st concurrent wait of one principal (here: anonymous) is refused; the 100
    waiting ones all end when the tag moves."""
    repo = "acme/crowded"
    first, second = _two_versions(http, repo)
    path = f"/api/v1/repositories/{repo}/tags/prod/watch"

    async def crowd() -> tuple[list[httpx.Response], httpx.Response]:
        limits = httpx.Limits(max_connections=MAX_WATCHES + 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            params = {"digest": first, "timeout": 30}
            waits = [
                asyncio.create_task(client.get(path, params=params)) for _ in range(MAX_WATCHES)
            ]
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(watches_in_flight, http)) < MAX_WATCHES:
                assert time.monotonic() < deadline, "the waits never all started"
                await asyncio.sleep(0.05)
            refused = await client.get(path, params=params)
            await asyncio.to_thread(_move, http, repo, "prod", f"{repo}-2", b"two")
            return list(await asyncio.gather(*waits)), refused

    answers, refused = asyncio.run(crowd())
    assert refused.status_code == 400
    assert error_codes(refused) == ["INVALID_REQUEST"]
    assert "100 tag watches" in refused.text
    assert {response.json()["digest"] for response in answers} == {second}
    assert watches_in_flight(http) == 0


def test_errors(http: httpx.Client) -> None:
    unknown = http.get("/api/v1/repositories/acme/nothing/tags/prod/watch", params={"timeout": 0})
    assert unknown.status_code == 404
    assert error_codes(unknown) == ["NAME_UNKNOWN"]
    _two_versions(http)
    bad = http.get(WATCH, params={"digest": "sha256:xyz", "timeout": 0})
    assert bad.status_code == 400
    assert error_codes(bad) == ["DIGEST_INVALID"]
    negative = http.get(WATCH, params={"timeout": -1})
    assert negative.status_code == 400
    assert error_codes(negative) == ["INVALID_REQUEST"]


def test_sdk_watch_tag(server: RegistryProcess, http: httpx.Client) -> None:
    first, second = _two_versions(http, "acme/sdk-watch")
    with Client(server.url) as client:
        assert client.watch_tag("acme/sdk-watch", "prod", None, timeout=5) == first
        assert client.watch_tag("acme/sdk-watch", "prod", first, timeout=0.5) == first
        assert client.watch_tag("acme/sdk-watch", "next", first, timeout=5) == second


def test_reading_a_tag_needs_read_scope(secured_server: RegistryProcess) -> None:
    url = secured_server.url
    with httpx.Client(base_url=url, headers=bearer(ADMIN_TOKEN), timeout=30) as admin:
        _two_versions(admin)
        tokens = {}
        for label, pattern in (("reader", "acme/*"), ("stranger", "other/*")):
            response = admin.post(
                "/api/v1/tokens",
                json={"name": label, "grants": [{"pattern": pattern, "scope": "read"}]},
            )
            tokens[label] = response.json()["token"]
    params = {"timeout": "0"}
    anonymous = httpx.get(f"{url}{WATCH}", params=params)
    assert anonymous.status_code == 401
    assert error_codes(anonymous) == ["UNAUTHORIZED"]
    stranger = httpx.get(f"{url}{WATCH}", params=params, headers=bearer(tokens["stranger"]))
    assert stranger.status_code == 403
    assert error_codes(stranger) == ["DENIED"]
    reader = httpx.get(f"{url}{WATCH}", params=params, headers=bearer(tokens["reader"]))
    assert reader.status_code == 200
    assert reader.json()["changed"] is True
