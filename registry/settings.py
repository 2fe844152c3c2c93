"""Service settings: one pydantic-settings class, read only when constructed."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

AnonymousAccess = Literal["auto", "none", "read", "write", "admin"]
StorageKind = Literal["filesystem", "s3"]


def default_home() -> Path:
    return platformdirs.user_data_path("peftreg", appauthor=False)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the service needs, from `PEFTREG_*` variables or arguments.

    Nothing here is read at import time: `Settings()` reads the environment
    when it is called, and `create_app(settings)` takes the result.
    """

    model_config = SettingsConfigDict(env_prefix="PEFTREG_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    host: str = "127.0.0.1"
    port: int = 8750

    database_url: str | None = None
    database_echo: bool = False
    auto_migrate: bool | None = None

    storage: StorageKind = "filesystem"
    storage_path: Path | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_redirect: bool = False
    s3_presign_seconds: int = 900

    anonymous: AnonymousAccess = "auto"
    admin_token: SecretStr | None = None
    token_signing_key: SecretStr | None = None
    """HMAC key of the registry tokens `/token` issues; every API replica needs the same
    one (unset: a random key per process, fine for one `peftreg serve`)."""
    token_service: str | None = None
    """The `service` of the Bearer challenge and of issued tokens (default: the Host header)."""
    token_realm: str | None = None
    """Where clients fetch registry tokens (default: `<the request's base URL>/token`)."""
    registry_token_seconds: int = Field(default=300, ge=1, le=24 * 3600)
    ui_session_secret: SecretStr | None = None
    """Signs web UI session cookies; set the same value on every replica (random if unset)."""

    embedded_worker: bool | None = None
    work_dir: Path | None = None
    worker_device: Literal["auto", "cpu", "cuda"] = "auto"
    worker_poll_seconds: float = 1.0
    job_lease_seconds: float = 60.0
    job_max_attempts: int = 3
    job_backoff_seconds: float = 5.0
    # Pause between tensors in job handlers: for failure drills and demos, never production.
    worker_throttle_seconds: float = 0.0

    max_manifest_bytes: int = 4 * 1024 * 1024
    upload_expiry_seconds: int = 24 * 3600

    log_format: Literal["text", "json"] = "text"
    gc_grace_seconds: float = Field(default=24 * 3600, ge=0)
    """Garbage collection spares blobs uploaded, mounted or checked this recently."""
    gc_interval_seconds: float = Field(default=0, ge=0)
    """`peftreg serve` collects garbage this often; 0 leaves it to `peftreg gc`."""
    db_read_threads: int | None = Field(default=None, ge=1, le=64)
    """Threads per server process running requests' read-only database work (default:
    1 on SQLite, 2 otherwise). Few on purpose: the work is mostly Python, so more threads
    only contend for the GIL (`make bench-api`'s listing load, 2 workers: 40 threads served
    1.2-1.4x fewer pages than 1 on SQLite, 1.6x fewer than 2 on PostgreSQL, whose reads
    also wait on the network)."""

    @field_validator("token_signing_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("PEFTREG_TOKEN_SIGNING_KEY must be at least 32 bytes (HMAC-SHA256)")
        return value

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'peftreg.db'}"

    def resolved_work_dir(self) -> Path:
        """Scratch space of job workers (pulled bases, outputs before upload)."""
        return self.work_dir or self.home / "work"

    def should_run_embedded_worker(self) -> bool:
        """`peftreg serve` runs a worker in-process on the embedded default (SQLite)."""
        if self.embedded_worker is not None:
            return self.embedded_worker
        return self.resolved_database_url().startswith("sqlite")

    def resolved_db_read_threads(self) -> int:
        if self.db_read_threads is not None:
            return self.db_read_threads
        return 1 if self.resolved_database_url().startswith("sqlite") else 2

    def resolved_storage_path(self) -> Path:
        return self.storage_path or self.home / "storage"

    def should_auto_migrate(self) -> bool:
        if self.auto_migrate is not None:
            return self.auto_migrate
        return self.resolved_database_url().startswith("sqlite")

    def anonymous_scope(self) -> Literal["none", "read", "write", "admin"]:
        """What an unauthenticated caller may do.

        `auto` grants everything on a loopback bind (a laptop) and nothing
        elsewhere: exposing the registry on a network needs tokens unless the
        operator explicitly names another level.
        """
        if self.anonymous == "auto":
            return "admin" if is_loopback(self.host) else "none"
        return self.anonymous
