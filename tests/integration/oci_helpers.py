"""Small OCI client helpers over httpx for the integration tests.

Deliberately independent of `client/`: the tests speak the wire protocol as
any OCI client would, so a bug in the shared library cannot hide one in the
service.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ADAPTER_ARTIFACT = "application/vnd.example.adapter.v1"  # opaque to validation
# Not the peftreg adapter config type, which the registry validates at push.
CONFIG_MEDIA_TYPE = "application/vnd.example.adapter.config.v1+json"
LAYER_MEDIA_TYPE = "application/octet-stream"


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def manifest_bytes(
    config: bytes, layers: list[tuple[str, int]], annotations: dict[str, str] | None = None
) -> bytes:
    """An OCI image manifest naming a JSON config and layers given by (digest, size)."""
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ADAPTER_ARTIFACT,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": digest_of(config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": size}
            for digest, size in layers
        ],
        "annotations": annotations or {},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Artifact:
    """A manifest naming a JSON config blob and some layer blobs."""

    config: bytes
    layers: tuple[bytes, ...]
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]

    @property
    def manifest(self) -> bytes:
        layers = [(digest_of(layer), len(layer)) for layer in self.layers]
        return manifest_bytes(self.config, layers, self.annotations)

    @property
    def manifest_digest(self) -> str:
        return digest_of(self.manifest)


def make_artifact(*layers: bytes, name: str = "adapter") -> Artifact:
    config = json.dumps({"name": name, "rank": 8}, sort_keys=True).encode()
    return Artifact(config=config, layers=tuple(layers))


def push_blob(client: httpx.Client, repository: str, data: bytes) -> httpx.Response:
    """Monolithic upload: `POST /blobs/uploads/?digest=` with the whole body."""
    return client.post(
        f"/v2/{repository}/blobs/uploads/",
        params={"digest": digest_of(data)},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )


def push_blob_chunked(
    client: httpx.Client, repository: str, chunks: Iterable[bytes], digest: str
) -> httpx.Response:
    """POST to open a session, one streamed PATCH, then PUT ?digest= to commit."""
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    started.raise_for_status()
    location = started.headers["Location"]
    patched = client.patch(
        location, content=iter(chunks), headers={"Content-Type": "application/octet-stream"}
    )
    patched.raise_for_status()
    return client.put(patched.headers["Location"], params={"digest": digest})


def push_manifest(
    client: httpx.Client, repository: str, reference: str, manifest: bytes
) -> httpx.Response:
    return client.put(
        f"/v2/{repository}/manifests/{reference}",
        content=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )


def push_artifact(client: httpx.Client, repository: str, tag: str, artifact: Artifact) -> str:
    """Push every blob (skipping those HEAD finds) and the manifest under `tag`."""
    for blob in artifact.blobs:
        digest = digest_of(blob)
        if client.head(f"/v2/{repository}/blobs/{digest}").status_code == 200:
            continue
        response = push_blob(client, repository, blob)
        assert response.status_code == 201, response.text
        assert response.headers["Docker-Content-Digest"] == digest
    response = push_manifest(client, repository, tag, artifact.manifest)
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == artifact.manifest_digest
    return artifact.manifest_digest


def pull_blob(client: httpx.Client, repository: str, digest: str) -> bytes:
    response = client.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status_code == 200, response.text
    assert digest_of(response.content) == digest
    return response.content


def error_codes(response: httpx.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return []
    return [entry.get("code") for entry in body.get("errors", [])]


def repeat_chunks(chunk: bytes, count: int) -> Iterator[bytes]:
    for _ in range(count):
        yield chunk
