"""Acceptance: the `oras` Python SDK pushes and pulls artifacts through peftreg.

oras-py talks plain HTTP when built with `insecure=True`. Against a secured
registry it is built with the `basic` auth backend, which sends HTTP Basic
credentials (the token being the password) whatever the challenge says; the
`Bearer` token flow is exercised in test_oci_clients.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import oras.client
import oras.decorator
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.fixtures.server import RegistryProcess

FILES = {
    "adapter_config.json": b'{"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}',
    "README.md": b"# support-bot adapter\n\nLoRA rank 16 on llama.\n" * 50,
}
LARGE_NAME = "adapter_model.safetensors"
LARGE_SIZE = 5 * 1024 * 1024 + 17


@pytest.fixture(autouse=True)
def isolated_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """oras reads and `login` writes ~/.docker/config.json: keep both in tmp."""
    home = tmp_path / "user-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("ORAS_USER", "ORAS_PASS", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name, data in FILES.items():
        (source / name).write_bytes(data)
    (source / LARGE_NAME).write_bytes(os.urandom(LARGE_SIZE))
    return source


def host(server: RegistryProcess) -> str:
    return f"127.0.0.1:{server.port}"


def push_directory(
    client: oras.client.OrasClient, target: str, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # oras requires pushed paths to be relative to the working directory
    monkeypatch.chdir(source)
    response = client.push(
        target=target,
        files=sorted(path.name for path in source.iterdir()),
        manifest_annotations={"org.example.purpose": "acceptance"},
        quiet=True,
    )
    assert response.status_code == 201


def assert_same_tree(source: Path, pulled: list[str], destination: Path) -> None:
    assert sorted(Path(p).name for p in pulled) == sorted(p.name for p in source.iterdir())
    for path in source.iterdir():
        copy = destination / path.name
        assert copy.is_file(), copy
        assert (
            hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()
        )
        assert copy.read_bytes() == path.read_bytes()


def test_oras_push_and_pull_directory(
    registry_server: RegistryProcess,
    source_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = oras.client.OrasClient(hostname=host(registry_server), insecure=True)
    target = f"{host(registry_server)}/acme/oras-bot:v1"
    push_directory(client, target, source_dir, monkeypatch)

    # the registry holds what oras pushed, as an OCI manifest with three layers
    manifest = httpx.get(f"{registry_server.url}/v2/acme/oras-bot/manifests/v1")
    assert manifest.status_code == 200
    document = manifest.json()
    assert len(document["layers"]) == 3
    assert document["annotations"]["org.example.purpose"] == "acceptance"
    large = next(
        layer
        for layer in document["layers"]
        if layer["annotations"]["org.opencontainers.image.title"] == LARGE_NAME
    )
    assert large["size"] == LARGE_SIZE
    assert client.get_tags(f"{host(registry_server)}/acme/oras-bot") == ["v1"]

    destination = tmp_path / "pulled"
    destination.mkdir()
    pulled = client.pull(target=target, outdir=str(destination))
    assert_same_tree(source_dir, pulled, destination)


def test_oras_chunked_push(
    registry_server: RegistryProcess,
    source_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = oras.client.OrasClient(hostname=host(registry_server), insecure=True)
    target = f"{host(registry_server)}/acme/oras-chunked:latest"
    monkeypatch.chdir(source_dir)
    response = client.push(
        target=target,
        files=sorted(path.name for path in source_dir.iterdir()),
        do_chunked=True,
        chunk_size=1024 * 1024,
        quiet=True,
    )
    assert response.status_code == 201
    destination = tmp_path / "pulled-chunked"
    destination.mkdir()
    pulled = client.pull(target=target, outdir=str(destination))
    assert_same_tree(source_dir, pulled, destination)


def test_oras_with_basic_auth_on_secured_server(
    secured_server: RegistryProcess,
    source_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = f"{host(secured_server)}/acme/secured-bot:v1"

    # Without credentials the push fails. oras-py's basic backend has nothing
    # to answer the 401 challenge with and raises AttributeError from inside
    # its request retry loop, which backs off for over two minutes between
    # attempts; that client-side back-off is skipped here. The registry side
    # is checked directly: nothing was stored.
    monkeypatch.setattr(oras.decorator.time, "sleep", lambda _seconds: None)
    anonymous = oras.client.OrasClient(
        hostname=host(secured_server), insecure=True, auth_backend="basic"
    )
    with pytest.raises((ValueError, AttributeError)):
        push_directory(anonymous, target, source_dir, monkeypatch)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    nothing = httpx.get(f"{secured_server.url}/v2/acme/secured-bot/manifests/v1", headers=admin)
    assert nothing.status_code == 404
    blobs = secured_server.home / "storage" / "blobs"
    assert not [path for path in blobs.rglob("*") if path.is_file()]
    challenge = httpx.head(f"{secured_server.url}/v2/acme/secured-bot/blobs/{'sha256:' + '0' * 64}")
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"].startswith("Bearer realm=")

    client = oras.client.OrasClient(
        hostname=host(secured_server), insecure=True, auth_backend="basic"
    )
    client.login(
        username="ci-robot",
        password=ADMIN_TOKEN,
        hostname=host(secured_server),
        config_path=str(tmp_path / "docker-config.json"),
    )
    push_directory(client, target, source_dir, monkeypatch)
    pushed = httpx.get(f"{secured_server.url}/v2/acme/secured-bot/manifests/v1", headers=admin)
    assert pushed.status_code == 200

    destination = tmp_path / "pulled-secured"
    destination.mkdir()
    pulled = client.pull(target=target, outdir=str(destination))
    assert_same_tree(source_dir, pulled, destination)

    # a client with the wrong password cannot pull
    wrong = oras.client.OrasClient(
        hostname=host(secured_server), insecure=True, auth_backend="basic"
    )
    wrong.auth.set_basic_auth("ci-robot", "not-the-token")
    with pytest.raises(ValueError):
        wrong.pull(target=target, outdir=str(tmp_path / "never"))
