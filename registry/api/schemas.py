"""JSON shapes of the management API (kept apart from the table classes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RepositoryOut(BaseModel):
    name: str
    created_at: str
    immutable_tags: list[str]
    versions: int
    tags: int


class RepositoryPage(BaseModel):
    items: list[RepositoryOut]
    next_cursor: str | None


class ArtifactSummaryOut(BaseModel):
    """What the registry learned validating an adapter (or base) artifact at push."""

    kind: str
    rank: int | None
    base_fingerprint: str | None
    base_quantization: str | None
    verified: bool
    fingerprint: str | None = None


class VersionOut(BaseModel):
    repository: str
    digest: str
    media_type: str
    artifact_type: str | None
    size: int
    annotations: dict[str, str]
    subject: str | None
    tags: list[str]
    pushed_by: str | None
    created_at: datetime
    adapter: ArtifactSummaryOut | None = None


class VersionPage(BaseModel):
    items: list[VersionOut]
    next_cursor: str | None


class VersionDetail(VersionOut):
    manifest: dict[str, Any]
    config: Any | None = Field(
        description="The config blob decoded as JSON when it is JSON and at most 1 MiB"
    )


class TagOut(BaseModel):
    name: str
    digest: str
    immutable: bool
    updated_at: datetime


class TagEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    tag: str
    from_digest: str | None
    to_digest: str | None
    actor: str
    at: datetime


class PolicyIn(BaseModel):
    immutable_tags: list[str] = Field(
        description="fnmatch patterns of tags that may be created but never moved or deleted"
    )


class GrantIn(BaseModel):
    pattern: str = Field(description="repository name pattern, e.g. 'acme/*' or '*'")
    scope: str = Field(description="read, write or admin")


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    grants: list[GrantIn] = Field(min_length=1)
    expires_at: datetime | None = None


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    grants: list[dict[str, Any]]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class IssuedTokenOut(BaseModel):
    id: str
    name: str
    grants: list[dict[str, Any]]
    token: str = Field(description="The secret; shown only in this response")


class DeletedVersionOut(BaseModel):
    digest: str
    tags_removed: list[str]


class AuditEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: datetime
    actor: str
    action: str
    repository: str | None
    target: str | None
    detail: dict[str, Any]
    request_id: str | None
