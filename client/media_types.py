"""The OCI and peftreg media types, the title annotation and `InvalidManifest`: no models.

`peftreg.manifest` (the pydantic models the registry validates with) re-exports
these; a push or a pull that needs only the names imports them from here and
spares the process pydantic.
"""

from __future__ import annotations

import json
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
EMPTY_JSON = "application/vnd.oci.empty.v1+json"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
TITLE_ANNOTATION = "org.opencontainers.image.title"

ADAPTER_ARTIFACT = "application/vnd.peftreg.adapter.v1"
ADAPTER_CONFIG_MEDIA_TYPE = "application/vnd.peftreg.adapter.config.v1+json"
BASE_ARTIFACT = "application/vnd.peftreg.base.v1"
CHECKPOINT_ARTIFACT = "application/vnd.peftreg.checkpoint.v1"
PROMPT_ARTIFACT = "application/vnd.peftreg.prompt.v1"


class InvalidManifest(ValueError):
    """Bytes that are not a valid OCI manifest or index."""


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no insignificant whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
