"""`Client`: typed methods for everything the registry's APIs offer."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import httpx

from peftreg.cache import Cache, offline_from_env
from peftreg.digest import Digest
from peftreg.media_types import BASE_ARTIFACT, MANIFEST_MEDIA_TYPES, OCI_MANIFEST, TITLE_ANNOTATION
from peftreg.reference import Reference
from peftreg.sdk.errors import DigestMismatch, InvalidRequest
from peftreg.sdk.http import DEFAULT_TIMEOUT, HttpSession
from peftreg.transfer import download, push, upload
from peftreg.transfer.digest_memo import DigestMemo

if TYPE_CHECKING:
    from pydantic import BaseModel

    from peftreg.adapters.schema import BaseReference
    from peftreg.prompts.package import HardPrompt
    from peftreg.sdk.jobs import JobInfo, JobLogLine
    from peftreg.sdk.models import (
        AuditEvent,
        DeletedVersion,
        Grant,
        IssuedToken,
        ManifestResponse,
        Repository,
        TagEvent,
        TagInfo,
        TokenInfo,
        Version,
        VersionDetail,
    )
    from peftreg.transfer import pull
from peftreg.transfer.progress import Progress

DEFAULT_URL = "http://127.0.0.1:8750"
_LINK_RE = re.compile(r'<([^>]+)>;\s*rel="next"')
M = TypeVar("M", bound="BaseModel")


def _digest(value: Digest | str) -> Digest:
    return value if isinstance(value, Digest) else Digest.parse(value)


def _reference(value: Reference | str) -> Reference:
    return value if isinstance(value, Reference) else Reference.parse(value)


class Client:
    """A registry client. Use as a context manager, or call `close()`.

    `transport` replaces httpx's (tests); `cache` is where pulls land
    (default `PEFTREG_CACHE`); `offline` (default `PEFTREG_OFFLINE`) makes
    pulls use the cache only.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retries: int = 4,
        backoff: float = 0.25,
        cache: Cache | str | os.PathLike[str] | None = None,
        offline: bool | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.http = HttpSession(
            self.url,
            token=token,
            transport=transport,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
        )
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.offline = offline_from_env() if offline is None else offline

    def _own_reference(self, value: Reference | str) -> Reference:
        """The reference, refused when it names a registry host other than this client's."""
        ref = _reference(value)
        if ref.registry is not None and ref.registry != urlsplit(self.url).netloc:
            raise InvalidRequest(
                f"{value} names the registry {ref.registry}; this client talks to {self.url}"
            )
        return ref

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # OCI: base ----------------------------------------------------------------

    def ping(self) -> None:
        """Check the registry answers and the credentials are accepted."""
        self.http.request("GET", "/v2/")

    def catalog(self) -> list[str]:
        return [
            str(name) for page in self._link_pages("/v2/_catalog") for name in page["repositories"]
        ]

    # OCI: blobs ---------------------------------------------------------------

    def blob_exists(self, repository: str, digest: Digest | str) -> bool:
        return upload.blob_size(self.http, repository, _digest(digest)) is not None

    def blob_size(self, repository: str, digest: Digest | str) -> int | None:
        return upload.blob_size(self.http, repository, _digest(digest))

    def get_blob(self, repository: str, digest: Digest | str) -> bytes:
        """A (small) blob's bytes in memory, verified."""
        wanted = _digest(digest)
        content = self.http.request("GET", download.blob_url(repository, wanted)).content
        if hashlib.new(wanted.algorithm, content).hexdigest() != wanted.hex:
            raise DigestMismatch(f"blob {wanted} from {repository} does not match its digest")
        return content

    def download_blob(
        self,
        repository: str,
        digest: Digest | str,
        size: int,
        *,
        progress: Progress | None = None,
    ) -> Path:
        """Download a blob into the cache (resumable, verified); its path there."""
        return download.download_blob(
            self.http, repository, _digest(digest), size, self.cache, progress=progress
        ).path

    def upload_blob(
        self,
        repository: str,
        source: Path | bytes,
        digest: Digest | str | None = None,
        *,
        mount_from: str | None = None,
        chunk_size: int | None = None,
        progress: Progress | None = None,
    ) -> upload.UploadOutcome:
        """Upload a file or bytes (resumable, skipped when present); how it went."""
        if isinstance(source, bytes):
            size = len(source)
            computed = Digest.of_bytes(source)
        else:
            from peftreg.digest import digest_file

            computed, size = digest_file(source)
        wanted = _digest(digest) if digest is not None else computed
        if wanted != computed:
            raise DigestMismatch(f"content is {computed}, not {wanted}")
        return upload.upload_blob(
            self.http,
            repository,
            wanted,
            size,
            source,
            mount_from=mount_from,
            chunk_size=chunk_size,
            progress=progress,
        )

    def mount_blob(self, repository: str, digest: Digest | str, source: str) -> bool:
        """Mount a blob from another repository; False when the server would not."""
        location = upload.mount_blob(self.http, repository, _digest(digest), source)
        if location is None:
            return True
        self.http.request("DELETE", location, ok=(404,))
        return False

    def delete_blob(self, repository: str, digest: Digest | str) -> None:
        self.http.request("DELETE", f"/v2/{repository}/blobs/{_digest(digest)}")

    # OCI: manifests, tags, referrers -------------------------------------------

    def get_manifest(self, reference: Reference | str) -> ManifestResponse:
        from peftreg.transfer.pull import fetch_manifest

        ref = self._own_reference(reference)
        digest, content = fetch_manifest(self.http, ref)
        response_type = self.http.request(
            "HEAD",
            f"/v2/{ref.repository}/manifests/{digest}",
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
        ).headers.get("content-type", OCI_MANIFEST)
        from peftreg.sdk.models import ManifestResponse

        return ManifestResponse(digest=str(digest), media_type=response_type, content=content)

    def resolve(self, reference: Reference | str) -> Digest:
        """The digest a tag (or digest) reference names, by HEAD."""
        ref = self._own_reference(reference)
        response = self.http.request(
            "HEAD",
            f"/v2/{ref.repository}/manifests/{ref.identifier}",
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
        )
        return Digest.parse(response.headers["docker-content-digest"])

    def put_manifest(
        self,
        reference: Reference | str,
        content: bytes,
        media_type: str = OCI_MANIFEST,
        *,
        tags: Sequence[str] = (),
    ) -> Digest:
        ref = self._own_reference(reference)
        response = self.http.request(
            "PUT",
            f"/v2/{ref.repository}/manifests/{ref.identifier}",
            params=[("tag", tag) for tag in tags],
            content=content,
            headers={"Content-Type": media_type},
        )
        return Digest.parse(response.headers["docker-content-digest"])

    def delete_manifest(self, reference: Reference | str) -> None:
        """By digest: delete the version (refused while tagged). By tag: untag."""
        ref = self._own_reference(reference)
        self.http.request("DELETE", f"/v2/{ref.repository}/manifests/{ref.identifier}")

    def list_tags(self, repository: str) -> list[str]:
        return [
            str(tag)
            for page in self._link_pages(f"/v2/{repository}/tags/list")
            for tag in page.get("tags") or []
        ]

    def referrers(
        self, repository: str, digest: Digest | str, artifact_type: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"artifactType": artifact_type} if artifact_type else None
        response = self.http.request(
            "GET", f"/v2/{repository}/referrers/{_digest(digest)}", params=params
        )
        return list(response.json().get("manifests", []))

    # management ---------------------------------------------------------------

    def repositories(self, query: str | None = None) -> list[Repository]:
        params = {"q": query} if query else {}
        from peftreg.sdk.models import Repository

        return list(self._cursor_pages("/api/v1/repositories", params, Repository))

    def versions(
        self,
        repository: str | None = None,
        *,
        artifact_type: str | None = None,
        annotations: Mapping[str, str] | None = None,
        kind: str | None = None,
        base: str | None = None,
        max_rank: int | None = None,
        base_quantization: str | None = None,
        verified: bool | None = None,
    ) -> list[Version]:
        """Versions, newest first; `kind`, `base` (a base fingerprint), `max_rank`,
        `base_quantization` and `verified` keep only adapters (or bases) that match."""
        params: dict[str, str | list[str]] = {}
        if artifact_type:
            params["artifact_type"] = artifact_type
        if kind:
            params["kind"] = kind
        if base:
            params["base"] = base
        if max_rank is not None:
            params["max_rank"] = str(max_rank)
        if base_quantization:
            params["base_quantization"] = base_quantization
        if verified is not None:
            params["verified"] = "true" if verified else "false"
        if annotations:
            params["annotation"] = [f"{k}={v}" for k, v in annotations.items()]
        path = f"/api/v1/repositories/{repository}/versions" if repository else "/api/v1/versions"
        from peftreg.sdk.models import Version

        return list(self._cursor_pages(path, params, Version))

    def version(self, reference: Reference | str) -> VersionDetail:
        ref = self._own_reference(reference)
        response = self.http.request(
            "GET", f"/api/v1/repositories/{ref.repository}/versions/{ref.identifier}"
        )
        from peftreg.sdk.models import VersionDetail

        return VersionDetail.model_validate(response.json())

    def tags(self, repository: str) -> list[TagInfo]:
        response = self.http.request("GET", f"/api/v1/repositories/{repository}/tags")
        from peftreg.sdk.models import TagInfo

        return [TagInfo.model_validate(item) for item in response.json()]

    def tag_history(self, repository: str, tag: str) -> list[TagEvent]:
        response = self.http.request("GET", f"/api/v1/repositories/{repository}/tags/{tag}/history")
        from peftreg.sdk.models import TagEvent

        return [TagEvent.model_validate(item) for item in response.json()]

    def watch_tag(
        self, repository: str, tag: str, digest: Digest | str | None, timeout: float = 30.0
    ) -> str | None:
        """Long-poll a tag: its digest as soon as it differs from `digest` (None: the tag
        does not exist), or `digest` again after `timeout` seconds (the server caps it)."""
        response = self.http.request(
            "GET",
            f"/api/v1/repositories/{repository}/tags/{tag}/watch",
            params={"digest": str(digest) if digest else "", "timeout": timeout},
            timeout=httpx.Timeout(timeout + 30.0, connect=10.0),
        )
        current = response.json()["digest"]
        return str(current) if current is not None else None

    def delete_version(
        self, repository: str, digest: Digest | str, *, force: bool = False
    ) -> DeletedVersion:
        response = self.http.request(
            "DELETE",
            f"/api/v1/repositories/{repository}/versions/{_digest(digest)}",
            params={"force": "true" if force else "false"},
        )
        from peftreg.sdk.models import DeletedVersion

        return DeletedVersion.model_validate(response.json())

    def set_policy(self, repository: str, immutable_tags: Sequence[str]) -> Repository:
        response = self.http.request(
            "PUT",
            f"/api/v1/repositories/{repository}/policy",
            json_body={"immutable_tags": list(immutable_tags)},
        )
        from peftreg.sdk.models import Repository

        return Repository.model_validate(response.json())

    def create_token(
        self,
        name: str,
        grants: Sequence[Grant | tuple[str, str]],
        *,
        expires_at: datetime | None = None,
    ) -> IssuedToken:
        from peftreg.sdk.models import Grant, IssuedToken

        body: dict[str, Any] = {
            "name": name,
            "grants": [
                grant.model_dump()
                if isinstance(grant, Grant)
                else {"pattern": grant[0], "scope": grant[1]}
                for grant in grants
            ],
        }
        if expires_at is not None:
            body["expires_at"] = expires_at.isoformat()
        response = self.http.request("POST", "/api/v1/tokens", json_body=body)
        return IssuedToken.model_validate(response.json())

    def list_tokens(self) -> list[TokenInfo]:
        response = self.http.request("GET", "/api/v1/tokens")
        from peftreg.sdk.models import TokenInfo

        return [TokenInfo.model_validate(item) for item in response.json()]

    def revoke_token(self, token_id: str) -> TokenInfo:
        response = self.http.request("DELETE", f"/api/v1/tokens/{token_id}")
        from peftreg.sdk.models import TokenInfo

        return TokenInfo.model_validate(response.json())

    def audit(self, repository: str | None = None, limit: int = 100) -> list[AuditEvent]:
        params: dict[str, str | list[str]] = {"limit": str(limit)}
        if repository:
            params["repository"] = repository
        response = self.http.request("GET", "/api/v1/audit", params=params)
        from peftreg.sdk.models import AuditEvent

        return [AuditEvent.model_validate(item) for item in response.json()]

    # artifacts ----------------------------------------------------------------

    def base_reference(self, base: str) -> BaseReference:
        """The base model `base` names: a registered base REF, or a bare fingerprint.

        A REF is resolved to the fingerprint and structure hash recorded in
        its base artifact's config.
        """
        import pydantic

        from peftreg.adapters.schema import BaseConfig, BaseReference

        if base.startswith("sha256:"):
            Digest.parse(base)
            return BaseReference(fingerprint=base)
        reference = self._own_reference(base)
        manifest = json.loads(self.get_manifest(reference).content)
        config_digest = manifest.get("config", {}).get("digest")
        if manifest.get("artifactType") != BASE_ARTIFACT or not config_digest:
            raise InvalidRequest(
                f"{base} is not a base artifact (push one with `peftreg base push`)"
            )
        try:
            config = BaseConfig.model_validate_json(
                self.get_blob(reference.repository, config_digest)
            )
        except pydantic.ValidationError:
            raise InvalidRequest(f"{base} has no valid base config") from None
        return BaseReference(
            name=str(reference),
            fingerprint=config.fingerprint,
            structure_hash=config.structure_hash,
        )

    def hard_prompt(self, reference: Reference | str) -> HardPrompt:
        """The hard prompt REF names: its text, placeholders, `render(**values)` and
        `token_ids(tokenizer_dir)` (checked against the tokenizer it is bound to)."""
        from peftreg.prompts.package import load_prompt

        return load_prompt(self, self._own_reference(reference))

    def base_model_config(self, base: str) -> dict[str, Any]:
        """The config.json of the registered base REF `base` names (its architecture)."""
        reference = _reference(base)
        manifest = json.loads(self.get_manifest(reference).content)
        for layer in manifest.get("layers") or []:
            if (layer.get("annotations") or {}).get(TITLE_ANNOTATION) == "config.json":
                document = json.loads(self.get_blob(reference.repository, layer["digest"]))
                if isinstance(document, dict):
                    return document
        raise InvalidRequest(f"{base} has no config.json layer: its architecture is unknown")

    def push(
        self,
        path: Path | str,
        reference: Reference | str,
        *,
        artifact_type: str | None = None,
        annotations: Mapping[str, str] | None = None,
        mount_from: str | None = None,
        base: BaseReference | None = None,
        base_ref: str | None = None,
        progress: Progress | None = None,
    ) -> push.PushResult:
        """Push a file or directory as one artifact (a layer per file).

        For a PEFT directory, `base` records which base model the adapter
        belongs to; the registry verifies it when that base is registered.
        With `base_ref` (a registered base REF), an adapter of the generic peft
        types is also checked here against the base's architecture (every
        tensor name and shape, as peft makes them; needs torch and peft).
        """
        return push.push_path(
            self.http,
            Path(path),
            self._own_reference(reference),
            artifact_type=artifact_type,
            annotations=annotations,
            mount_from=mount_from,
            base=base,
            base_architecture=(lambda: self.base_model_config(base_ref)) if base_ref else None,
            progress=progress,
            memo=DigestMemo(self.cache.root / "digests"),
        )

    def pull(
        self,
        reference: Reference | str,
        output: Path | str | None = None,
        *,
        replace: bool = False,
        progress: Progress | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        fallback_to_cache: bool = True,
    ) -> pull.PullResult:
        """Pull into the cache (and `output`); offline, from the cache only.

        `include`/`exclude`: globs over file titles. With `fallback_to_cache`,
        an unreachable registry is answered from the cache when it holds the
        reference (the result's `offline_fallback` says why).
        """
        from peftreg.transfer import pull

        return pull.pull(
            None if self.offline else self.http,
            self.cache,
            self._own_reference(reference),
            output=Path(output) if output is not None else None,
            replace=replace,
            progress=progress,
            include=include,
            exclude=exclude,
            fallback_to_cache=fallback_to_cache,
        )

    # jobs (their module is imported by these methods: a push or pull never loads it) --

    def export(
        self,
        adapters: Sequence[tuple[str, float]] | str,
        base: str,
        *,
        dtype: str | None = None,
        base_quantization: str = "none",
        quantize: str = "none",
        group_size: int = 128,
        algorithm: str = "rtn",
        output_format: str = "safetensors",
        calibration: str | None = None,
        calibration_samples: int | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[JobInfo, bool]:
        """Request a merged (optionally INT4) checkpoint, or with `output_format="gguf"` a
        GGUF model file (`quantize` f16, q8_0, q4_0 or q4_k_m); returns (job, newly created).

        INT4 `algorithm` gptq or awq (llm-compressor) calibrates on `calibration`, the
        reference of a pushed text or JSONL file (one `text` per line)."""
        sources = [(adapters, 1.0)] if isinstance(adapters, str) else list(adapters)
        from peftreg.sdk import jobs as job_api

        return job_api.request_export(
            self.http,
            sources,
            base,
            dtype=dtype,
            base_quantization=base_quantization,
            quantize=quantize,
            group_size=group_size,
            algorithm=algorithm,
            output_format=output_format,
            calibration=calibration,
            calibration_samples=calibration_samples,
            max_sequence_length=max_sequence_length,
        )

    def job(self, job_id: str) -> JobInfo:
        from peftreg.sdk import jobs as job_api

        return job_api.get_job(self.http, job_id)

    def jobs(
        self, *, status: str | None = None, kind: str | None = None, repository: str | None = None
    ) -> list[JobInfo]:
        from peftreg.sdk import jobs as job_api

        return job_api.list_jobs(self.http, status=status, kind=kind, repository=repository)

    def job_logs(self, job_id: str, *, after: int = 0) -> list[JobLogLine]:
        from peftreg.sdk import jobs as job_api

        return job_api.job_logs(self.http, job_id, after=after)

    def cancel_job(self, job_id: str) -> JobInfo:
        from peftreg.sdk import jobs as job_api

        return job_api.cancel_job(self.http, job_id)

    def wait_job(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        interval: float = 0.5,
        on_update: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """Poll until the job ends; raises `JobFailed` unless it succeeded."""
        from peftreg.sdk import jobs as job_api

        return job_api.wait_job(
            self.http, job_id, timeout=timeout, interval=interval, on_update=on_update
        )

    # pagination ---------------------------------------------------------------

    def _link_pages(self, path: str) -> Iterator[dict[str, Any]]:
        next_path: str | None = path
        while next_path:
            response = self.http.request("GET", next_path)
            yield dict(response.json())
            match = _LINK_RE.search(response.headers.get("link", ""))
            next_path = match.group(1) if match else None

    def _cursor_pages(
        self, path: str, params: Mapping[str, str | list[str]], model: type[M]
    ) -> Iterator[M]:
        cursor: str | None = None
        while True:
            page_params: dict[str, str | list[str]] = {**params, "limit": "1000"}
            if cursor:
                page_params["cursor"] = cursor
            body = self.http.request("GET", path, params=page_params).json()
            for item in body["items"]:
                yield model.model_validate(item)
            cursor = body.get("next_cursor")
            if not cursor:
                return
