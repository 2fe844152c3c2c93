"""References with a registry host, as docker and oras write them, and where they lead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftreg.cli.config import remember, resolve, url_for
from peftreg.reference import InvalidReference, Reference
from peftreg.sdk.client import Client
from peftreg.sdk.errors import InvalidRequest

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repository", "identifier"),
    [
        ("acme/bot:v1", None, "acme/bot", "v1"),
        ("acme/bot", None, "acme/bot", "latest"),
        ("127.0.0.1:8750/acme/bot:v1", "127.0.0.1:8750", "acme/bot", "v1"),
        ("localhost:5000/acme/bot", "localhost:5000", "acme/bot", "latest"),
        ("localhost/acme/bot", "localhost", "acme/bot", "latest"),
        ("registry.example.com/acme/nlp/bot:prod", "registry.example.com", "acme/nlp/bot", "prod"),
        (f"[::1]:5000/acme/bot@{DIGEST}", "[::1]:5000", "acme/bot", DIGEST),
    ],
)
def test_host_is_split_by_dockers_rule(
    text: str, registry: str | None, repository: str, identifier: str
) -> None:
    reference = Reference.parse(text)
    assert (reference.registry, reference.repository, reference.identifier) == (
        registry,
        repository,
        identifier,
    )
    assert str(reference) == f"{repository}{'@' if '@' in text else ':'}{identifier}"


@pytest.mark.parametrize("text", ["bad_host:1/acme/a", "host:99999999/acme/a", "h.example/"])
def test_invalid_hosts_are_refused(text: str) -> None:
    with pytest.raises(InvalidReference):
        Reference.parse(text)


def test_host_selects_url_and_token_and_the_env_token_stays_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.json"
    monkeypatch.setenv("PEFTREG_CONFIG", str(config))
    monkeypatch.delenv("PEFTREG_URL", raising=False)
    monkeypatch.setenv("PEFTREG_TOKEN", "env-token")
    data = remember({}, "https://registry.example.com", "example-token")
    data = remember(data, "http://127.0.0.1:8750", "local-token")
    config.write_text(json.dumps(data))

    assert resolve().url == "http://127.0.0.1:8750"
    assert resolve().token == "env-token"  # the environment wins for the default registry
    example = resolve("registry.example.com")
    assert (example.url, example.token) == ("https://registry.example.com", "example-token")
    unknown = resolve("localhost:5000")
    assert (unknown.url, unknown.token) == ("http://localhost:5000", None)
    assert url_for("ghcr.io") == "https://ghcr.io"


def test_sdk_refuses_a_reference_to_another_registry() -> None:
    with Client("http://127.0.0.1:8750") as client, pytest.raises(InvalidRequest, match="names"):
        client.resolve("registry.example.com/acme/bot:v1")
