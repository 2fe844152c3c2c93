"""Push a file or a directory as one OCI artifact: a layer per file, then the manifest."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftreg.digest import Digest
from peftreg.media_types import (
    ADAPTER_ARTIFACT,
    EMPTY_JSON,
    OCI_MANIFEST,
    TITLE_ANNOTATION,
    canonical_json,
)
from peftreg.reference import Reference
from peftreg.sdk.errors import DigestMismatch, InvalidRequest
from peftreg.sdk.http import HttpSession
from peftreg.transfer.digest_memo import DigestMemo
from peftreg.transfer.progress import NullProgress, Progress
from peftreg.transfer.titles import check_titles
from peftreg.transfer.upload import upload_blob, upload_file

if TYPE_CHECKING:
    from peftreg.adapters.schema import BaseReference

if TYPE_CHECKING:
    from peftreg.adapters.peft_import import ImportedAdapter

GENERIC_ARTIFACT = "application/vnd.peftreg.artifact.v1"
LAYER_MEDIA_TYPE = "application/octet-stream"
EMPTY_CONFIG = b"{}"


@dataclass(frozen=True)
class LocalFile:
    title: str
    path: Path
    digest: Digest
    size: int
    media_type: str = LAYER_MEDIA_TYPE


@dataclass(frozen=True)
class PushResult:
    reference: Reference
    digest: Digest
    files: list[LocalFile]
    uploaded_blobs: int
    skipped_blobs: int


class _Background:
    """One call run on its own thread; `result()` waits for it and raises what it raised."""

    def __init__(self, call: Callable[..., object], *args: object) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(call, *args), name="peftreg-push", daemon=True
        )
        self._thread.start()

    def _run(self, call: Callable[..., object], *args: object) -> None:
        try:
            call(*args)
        except BaseException as exc:  # raised by `result`, on the caller's thread
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def collect_files(path: Path) -> list[tuple[str, Path]]:
    """(title, path) of a file, or of every regular file under a directory, sorted."""
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise InvalidRequest(f"{path} is neither a file nor a directory")
    found = [
        (item.relative_to(path).as_posix(), item)
        for item in sorted(path.rglob("*"))
        if item.is_file()
    ]
    if not found:
        raise InvalidRequest(f"{path} holds no files to push")
    return found


def build_manifest(
    files: Sequence[LocalFile],
    artifact_type: str,
    annotations: Mapping[str, str] | None,
    config: tuple[str, bytes] = (EMPTY_JSON, EMPTY_CONFIG),
    subject: Mapping[str, object] | None = None,
) -> bytes:
    """`config` is the config blob's (media type, bytes); `subject` a manifest descriptor."""
    document: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": config[0],
            "digest": str(Digest.of_bytes(config[1])),
            "size": len(config[1]),
        },
        "layers": [
            {
                "mediaType": item.media_type,
                "digest": str(item.digest),
                "size": item.size,
                "annotations": {TITLE_ANNOTATION: item.title},
            }
            for item in files
        ],
    }
    if subject is not None:
        document["subject"] = dict(subject)
    if annotations:
        document["annotations"] = dict(annotations)
    return canonical_json(document)


def check_architecture(
    imported: ImportedAdapter, base_architecture: Callable[[], Mapping[str, Any]], base: str
) -> None:
    """Check a generic peft adapter against its base's architecture; refuse when the
    tools for that check (torch, transformers, peft) are not installed."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise InvalidRequest(
            f"checking a {imported.config.kind} adapter against its base needs torch, "
            "transformers and peft installed; install them, or push without --base to store "
            "it unverified"
        ) from None
    from peftreg.adapters.peft_layout import check_against_architecture

    check_against_architecture(imported, base_architecture(), base)


def _may_be_adapter(path: Path) -> bool:
    """A PEFT or AdapterHub directory (checked without importing the adapter modules for
    plain files)."""
    if not (path / "adapter_config.json").is_file():
        return False
    from peftreg.adapters.adapterhub import is_adapterhub_directory
    from peftreg.adapters.peft_import import is_peft_directory

    return is_peft_directory(path) or is_adapterhub_directory(path)


def push_path(
    http: HttpSession,
    path: Path,
    reference: Reference,
    *,
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
    mount_from: str | None = None,
    base: BaseReference | None = None,
    base_architecture: Callable[[], Mapping[str, Any]] | None = None,
    progress: Progress | None = None,
    memo: DigestMemo | None = None,
) -> PushResult:
    """Upload every file (skipping what the server has) and put the manifest.

    A PEFT directory (adapter_config.json + adapter_model.safetensors or
    nola.safetensors), or an AdapterHub one (`peftreg.adapters.adapterhub`: its LoRA
    as a PEFT LoRA), is pushed as a typed adapter (see client.adapters.package),
    unless another artifact type is asked for; its pickle files are refused
    before anything is uploaded. `base_architecture` gives the base's config.json: an
    adapter of a generic peft type is checked against it before anything is uploaded
    (`peftreg.adapters.peft_layout`). Each file is read once: hashed while it is sent,
    unless `memo` remembers its digest from an earlier push.
    """
    with ExitStack() as stack:
        return _push_path(
            stack,
            http,
            path,
            reference,
            artifact_type=artifact_type,
            annotations=annotations,
            mount_from=mount_from,
            base=base,
            base_architecture=base_architecture,
            progress=progress,
            memo=memo,
        )


def _push_path(
    stack: ExitStack,
    http: HttpSession,
    path: Path,
    reference: Reference,
    *,
    artifact_type: str | None,
    annotations: Mapping[str, str] | None,
    mount_from: str | None,
    base: BaseReference | None,
    base_architecture: Callable[[], Mapping[str, Any]] | None,
    progress: Progress | None,
    memo: DigestMemo | None,
) -> PushResult:
    progress = progress or NullProgress()
    config: tuple[str, bytes] = (EMPTY_JSON, EMPTY_CONFIG)
    if artifact_type in (None, ADAPTER_ARTIFACT) and _may_be_adapter(path):
        from peftreg.adapters.adapterhub import imported_adapter
        from peftreg.adapters.documents import base_document
        from peftreg.adapters.kinds import ADAPTER_CONFIG_MEDIA_TYPE, GENERIC_KINDS
        from peftreg.adapters.package import adapter_annotations, adapter_artifact_files

        # An AdapterHub LoRA is converted to a PEFT directory that lives until the upload ends.
        imported = stack.enter_context(imported_adapter(path))
        if base_architecture is not None and imported.document["kind"] in GENERIC_KINDS:
            check_architecture(imported, base_architecture, (base and base.name) or "the base")
        if base is not None:
            imported = imported.with_base(base_document(**base.model_dump()))
        config_bytes, layers = adapter_artifact_files(imported)
        config = (ADAPTER_CONFIG_MEDIA_TYPE, config_bytes)
        check_titles([title for _path, title, _media in layers])
        entries = [(title, item, media) for item, title, media in layers]
        artifact_type = ADAPTER_ARTIFACT
        annotations = {
            **adapter_annotations(imported.document, path.absolute().name),
            **(annotations or {}),
        }
    else:
        if base is not None:
            raise InvalidRequest(
                f"{path} is not a PEFT adapter directory; a base applies to adapters"
            )
        found = collect_files(path)
        check_titles([title for title, _path in found])
        entries = [(title, item, LAYER_MEDIA_TYPE) for title, item in found]
    repository = reference.repository
    # The config blob's round trips (HEAD, then POST) overlap the files' uploads.
    config_upload = _Background(
        upload_blob, http, repository, Digest.of_bytes(config[1]), len(config[1]), config[1]
    )
    stack.callback(config_upload.join)
    progress.start(sum(item.stat().st_size for _t, item, _m in entries), f"push {reference}")
    try:
        files, uploaded = _upload_files(http, repository, entries, mount_from, progress, memo)
    finally:
        progress.finish()
    config_upload.result()
    kind = artifact_type or GENERIC_ARTIFACT
    content = build_manifest(files, kind, annotations, config)
    digest = Digest.of_bytes(content)
    if reference.digest is not None and reference.digest != digest:
        raise DigestMismatch(f"the manifest pushed is {digest}, not {reference.digest}")
    response = http.request(
        "PUT",
        f"/v2/{repository}/manifests/{reference.identifier}",
        content=content,
        headers={"Content-Type": OCI_MANIFEST},
    )
    returned = response.headers.get("docker-content-digest")
    if returned and returned != str(digest):
        raise DigestMismatch(f"the registry stored the manifest as {returned}, not {digest}")
    return PushResult(reference, digest, files, uploaded, len(files) - uploaded)


def _upload_files(
    http: HttpSession,
    repository: str,
    entries: Sequence[tuple[str, Path, str]],
    mount_from: str | None,
    progress: Progress,
    memo: DigestMemo | None,
) -> tuple[list[LocalFile], int]:
    """Each (title, path, media type) uploaded in turn; (the files, how many were sent)."""
    files: list[LocalFile] = []
    uploaded = 0
    for title, item, media in entries:
        digest, size, outcome = upload_file(
            http,
            repository,
            item,
            known=memo.get(item) if memo is not None else None,
            mount_from=mount_from,
            progress=progress,
        )
        if memo is not None:
            memo.put(item, digest)
        files.append(LocalFile(title, item, digest, size, media_type=media))
        uploaded += outcome == "uploaded"
    return files, uploaded
