"""What the management API returns, as typed models."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Repository(_Model):
    name: str
    created_at: str
    immutable_tags: list[str]
    versions: int
    tags: int


class ArtifactSummary(_Model):
    """What the registry indexed validating an adapter (or base) artifact at push."""

    kind: str
    rank: int | None = None
    base_fingerprint: str | None = None
    base_quantization: str | None = None
    verified: bool = False
    fingerprint: str | None = None


class Version(_Model):
    repository: str
    digest: str
    media_type: str
    artifact_type: str | None = None
    size: int
    annotations: dict[str, str] = {}
    subject: str | None = None
    tags: list[str] = []
    pushed_by: str | None = None
    created_at: datetime
    adapter: ArtifactSummary | None = None


class VersionDetail(Version):
    manifest: dict[str, Any]
    config: Any | None = None


class TagInfo(_Model):
    name: str
    digest: str
    immutable: bool
    updated_at: datetime


class TagEvent(_Model):
    tag: str
    from_digest: str | None = None
    to_digest: str | None = None
    actor: str
    at: datetime


class Grant(_Model):
    pattern: str
    scope: str


class TokenInfo(_Model):
    id: str
    name: str
    grants: list[dict[str, Any]]
    created_by: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class IssuedToken(_Model):
    id: str
    name: str
    grants: list[dict[str, Any]]
    token: str


class DeletedVersion(_Model):
    digest: str
    tags_removed: list[str]


class AuditEvent(_Model):
    at: datetime
    actor: str
    action: str
    repository: str | None = None
    target: str | None = None
    detail: dict[str, Any] = {}
    request_id: str | None = None


class ManifestResponse(_Model):
    digest: str
    media_type: str
    content: bytes
