"""`peftreg cache rm REF`: forget one cached reference and what only it used.

A tag reference drops that tag; a digest reference drops every cached tag of
the version and the version itself. The manifests those refs named go unless
another ref still names them, with their snapshots; blobs go unless a manifest
still in the cache names them. Nothing another reference needs is touched.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

from peftreg.cache import Cache, remove_tree
from peftreg.digest import Digest, InvalidDigest
from peftreg.reference import Reference
from peftreg.sdk.errors import CacheMiss


@dataclass
class Eviction:
    refs: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    blobs: int = 0
    freed_bytes: int = 0


def _blobs_of(content: bytes) -> set[Digest]:
    found: set[Digest] = set()
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        document = json.loads(content)
        for item in [document.get("config"), *(document.get("layers") or [])]:
            if isinstance(item, dict) and isinstance(item.get("digest"), str):
                with contextlib.suppress(InvalidDigest):
                    found.add(Digest.parse(item["digest"]))
    return found


def evict(cache: Cache, reference: Reference) -> Eviction:
    """Remove `reference` from the cache; `CacheMiss` when it is not there."""
    refs = [
        ref
        for ref in cache.iter_refs()
        if ref.repository == reference.repository
        and (
            ref.tag == reference.tag if reference.digest is None else ref.digest == reference.digest
        )
    ]
    targets = {ref.digest for ref in refs}
    if reference.digest is not None and cache.get_manifest(reference.digest) is not None:
        targets.add(reference.digest)
    if not targets:
        raise CacheMiss(f"{reference} is not in the cache {cache.root}")
    result = Eviction()
    for ref in refs:
        cache.ref_path(ref.repository, ref.tag).unlink(missing_ok=True)
        result.refs.append(f"{ref.repository}:{ref.tag}")
    still_named = {ref.digest for ref in cache.iter_refs()}
    for digest in sorted(targets - still_named, key=str):
        content = cache.get_manifest(digest)
        cache.manifest_path(digest).unlink(missing_ok=True)
        snapshot = cache.snapshot_path(digest)
        remove_tree(snapshot)
        remove_tree(snapshot.with_name(f"{snapshot.name}.unpacked"))
        result.manifests.append(str(digest))
        if content is None:
            continue
        kept: set[Digest] = set()
        for other in cache.iter_manifests():
            other_content = cache.get_manifest(other)
            if other_content is not None:
                kept |= _blobs_of(other_content)
        for blob in _blobs_of(content) - kept:
            path = cache.blob_path(blob)
            with cache.lock(str(blob)), contextlib.suppress(FileNotFoundError):
                result.freed_bytes += path.stat().st_size
                path.unlink()
                result.blobs += 1
    return result
