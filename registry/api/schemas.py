"""JSON shapes of the management API (kept apart from the table classes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    pattern: str = Field(min_length=1, description="repository name pattern, e.g. 'acme/*' or '*'")
    scope: Literal["read", "write", "admin"]


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    grants: list[GrantIn] = Field(min_length=1)
    expires_at: datetime | None = None

    @field_validator("expires_at", mode="before")
    @classmethod
    def _timestamp_text(cls, value: Any) -> Any:
        """RFC 3339 text or null, as documented; not a number read as Unix seconds."""
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("expires_at must be an RFC 3339 date-time string")
        return value


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
