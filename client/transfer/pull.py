"""Pull an artifact: resolve, download blobs into the cache, materialize, export.

Online, the manifest is fetched and verified, its blobs downloaded into the
cache (skipping those already there) and the cache's snapshot built. Offline
(`PEFTREG_OFFLINE=1`), references, manifests and blobs come from the cache
only and a missing piece is an error. Everything is checked before any
output is written, and an output directory is built next to its final
place and renamed into it, so it is never left half-written.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from peftreg.cache import Cache, link_or_copy, remove_tree
from peftreg.digest import Digest, InvalidDigest
from peftreg.media_types import (
    ADAPTER_CONFIG_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPES,
    TITLE_ANNOTATION,
    InvalidManifest,
)
from peftreg.reference import Reference
from peftreg.sdk.errors import (
    CacheMiss,
    Conflict,
    DigestMismatch,
    InvalidRequest,
    TransportError,
)
from peftreg.sdk.http import HttpSession
from peftreg.transfer.download import download_blob
from peftreg.transfer.layers import read_image_layers
from peftreg.transfer.progress import NullProgress, Progress
from peftreg.transfer.titles import layer_paths
from peftreg.transfer.unpack import is_directory_layer, unpack_directory

SnapshotFile = tuple[PurePosixPath, Digest, int]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullResult:
    reference: Reference
    digest: Digest
    path: Path  # the output directory, or the cache snapshot without one
    files: list[SnapshotFile]
    downloaded: int  # bytes received from the registry
    adapter_config: bytes | None = None  # the config blob of a typed adapter artifact
    offline_fallback: str | None = None  # why the cache was served: the registry's error
    unpacked: frozenset[PurePosixPath] = frozenset()  # oras directory layers, unpacked


def fetch_manifest(http: HttpSession, reference: Reference) -> tuple[Digest, bytes]:
    """GET a manifest and check its bytes against the digest asked for or announced."""
    response = http.request(
        "GET",
        f"/v2/{reference.repository}/manifests/{reference.identifier}",
        headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
    )
    content = response.content
    actual = Digest("sha256", hashlib.sha256(content).hexdigest())
    expected_text = str(reference.digest) if reference.digest else None
    expected_text = expected_text or response.headers.get("docker-content-digest")
    if expected_text is not None:
        try:
            expected = Digest.parse(expected_text)
        except InvalidDigest as exc:
            raise DigestMismatch(f"the registry announced an invalid digest: {exc}") from None
        if hashlib.new(expected.algorithm, content).hexdigest() != expected.hex:
            raise DigestMismatch(f"manifest of {reference} does not match {expected}")
        return expected, content
    return actual, content


def resolve_offline(cache: Cache, reference: Reference) -> tuple[Digest, bytes]:
    digest = reference.digest
    if digest is None:
        assert reference.tag is not None
        digest = cache.get_ref(reference.repository, reference.tag)
        if digest is None:
            raise CacheMiss(f"offline: {reference} was never pulled into the cache {cache.root}")
    content = cache.get_manifest(digest)
    if content is None:
        raise CacheMiss(f"offline: manifest {digest} of {reference} is not in the cache")
    return digest, content


def resolve_cached(cache: Cache, reference: Reference) -> tuple[Digest, bytes] | None:
    """The cached manifest of `reference` when its bytes still match its digest, else None."""
    try:
        digest, content = resolve_offline(cache, reference)
    except CacheMiss:
        return None
    if hashlib.new(digest.algorithm, content).hexdigest() != digest.hex:
        return None
    return digest, content


def select_files(
    files: list[SnapshotFile], include: Sequence[str], exclude: Sequence[str]
) -> list[SnapshotFile]:
    """The files whose titles match an `include` glob (all without one) and no `exclude`."""

    def matches(title: PurePosixPath, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(str(title), pattern) for pattern in patterns)

    selected = [
        item
        for item in files
        if (not include or matches(item[0], include)) and not matches(item[0], exclude)
    ]
    if (include or exclude) and not selected:
        raise InvalidRequest(
            "no file matches --include/--exclude; the artifact holds: "
            + ", ".join(str(title) for title, _digest, _size in files)
        )
    return selected


def directory_layers(content: bytes) -> frozenset[PurePosixPath]:
    """Titles of the oras directory layers (tar+gzip marked for unpacking)."""
    parsed = read_image_layers(content)
    if parsed is None:
        return frozenset()
    return frozenset(
        PurePosixPath((layer.annotations or {})[TITLE_ANNOTATION])
        for layer in parsed.layers
        if is_directory_layer(layer.media_type, layer.annotations)
        and (layer.annotations or {}).get(TITLE_ANNOTATION)
    )


def snapshot_files(reference: Reference, content: bytes) -> list[SnapshotFile]:
    """The (title, digest, size) of every layer, titles checked for safety."""
    try:
        parsed = read_image_layers(content)
    except InvalidManifest as exc:
        raise InvalidRequest(f"{reference}: {exc}") from None
    if parsed is None:
        raise InvalidRequest(f"{reference} is an index; pull one of its manifests by digest")
    paths = layer_paths(parsed.layers)
    return [
        (path, Digest.parse(layer.digest), layer.size)
        for path, layer in zip(paths, parsed.layers, strict=True)
    ]


def pull(
    http: HttpSession | None,
    cache: Cache,
    reference: Reference,
    *,
    output: Path | None = None,
    replace: bool = False,
    progress: Progress | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    fallback_to_cache: bool = True,
) -> PullResult:
    """Pull into the cache and, with `output`, into that directory.

    `http` None means offline: the cache is the only source. With
    `fallback_to_cache`, a registry that cannot be reached is answered from
    the cache when it holds the reference and its manifest still matches its
    digest (`offline_fallback` then says why); otherwise the error stands.
    `include`/`exclude` are globs over file titles. oras directory layers are
    unpacked into the output (without one, next to the cache's snapshot).
    """
    progress = progress or NullProgress()
    if output is not None:
        _check_output(output, replace)
    fallback: str | None = None
    if http is None:
        digest, content = resolve_offline(cache, reference)
    else:
        try:
            digest, content = fetch_manifest(http, reference)
        except TransportError as exc:
            cached = resolve_cached(cache, reference) if fallback_to_cache else None
            if cached is None:
                raise
            digest, content = cached
            fallback = str(exc)
            http = None
            logger.warning("registry unreachable; serving %s from the cache: %s", reference, exc)
    files = select_files(snapshot_files(reference, content), include, exclude)
    missing = [item for item in files if not cache.has_blob(item[1], item[2])]
    downloaded = 0
    if missing and http is None:
        first = missing[0]
        why = f"{fallback}; the cache cannot stand in" if fallback else "offline"
        raise CacheMiss(
            f"{why}: blob {first[1]} ({first[0]}) of {reference} is not in the cache; "
            f"{len(missing)} of {len(files)} files missing"
        )
    if http is not None:
        cache.put_manifest(digest, content)
        progress.start(sum(size for _title, _digest, size in missing), f"pull {reference}")
        try:
            for _title, blob, size in missing:
                downloaded += download_blob(
                    http, reference.repository, blob, size, cache, progress=progress
                ).downloaded
        finally:
            progress.finish()
        if reference.tag is not None:
            cache.set_ref(reference.repository, reference.tag, digest)
    adapter_config = _adapter_config(http, cache, reference, content)
    snapshot = cache.materialize(digest, files)
    path = snapshot
    unpack = directory_layers(content) & {title for title, _digest, _size in files}
    if output is None and unpack:
        output, replace = snapshot.with_name(f"{snapshot.name}.unpacked"), True
    if output is not None:
        export(snapshot, files, output, replace=replace, unpack=unpack)
        path = output
    return PullResult(reference, digest, path, files, downloaded, adapter_config, fallback, unpack)


def _adapter_config(
    http: HttpSession | None, cache: Cache, reference: Reference, content: bytes
) -> bytes | None:
    """The config blob of an adapter artifact, through the cache (offline: from it)."""
    parsed = read_image_layers(content)
    if parsed is None:
        return None
    if parsed.config.media_type != ADAPTER_CONFIG_MEDIA_TYPE:
        return None
    blob, size = Digest.parse(parsed.config.digest), parsed.config.size
    if not cache.has_blob(blob, size):
        if http is None:
            raise CacheMiss(
                f"offline: the adapter config {blob} of {reference} is not in the cache"
            )
        download_blob(http, reference.repository, blob, size, cache)
    return cache.blob_path(blob).read_bytes()


def _check_output(output: Path, replace: bool) -> None:
    if output.exists() and not output.is_dir():
        raise Conflict(f"{output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not replace:
        raise Conflict(f"{output} exists and is not empty; pass --force to replace it")


def export(
    snapshot: Path,
    files: list[SnapshotFile],
    output: Path,
    *,
    replace: bool,
    unpack: frozenset[PurePosixPath] = frozenset(),
) -> None:
    """Build the output directory next to its place, then rename it in.

    Titles in `unpack` are oras directory layers: unpacked, not copied.
    """
    output = output.absolute()
    _check_output(output, replace)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.peftreg-{uuid.uuid4().hex}"
    retired = output.parent / f".{output.name}.peftreg-old-{uuid.uuid4().hex}"
    try:
        staging.mkdir()
        for title, _digest, _size in files:
            dest = staging / title
            dest.parent.mkdir(parents=True, exist_ok=True)
            if title in unpack:
                unpack_directory(snapshot / title, title, staging)
            else:
                link_or_copy(snapshot / title, dest)
        if output.is_dir():
            os.rename(output, retired)
        os.rename(staging, output)
    except BaseException:
        if retired.exists() and not output.exists():
            os.rename(retired, output)
        raise
    finally:
        remove_tree(staging)
        remove_tree(retired)
