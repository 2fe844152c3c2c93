"""Manifest DELETE as the OCI distribution spec and its clients expect it.

- By tag: the tag goes (202), whatever other tags point at the same version.
- By digest: the version goes with every movable tag pointing at it (202),
  as distribution does; `skopeo delete` and `oras manifest delete REF:TAG`
  resolve a tag and delete by digest, so this is what they need.
- An immutable release tag keeps its protection on both paths: the spec's
  "deletion not allowed" status (405 UNSUPPORTED) with a message naming the tag.

The management API (`DELETE /api/v1/.../versions/{digest}`) keeps its
stricter rule: a tagged version is refused unless `force`.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from peftreg.registry.auth.scopes import Principal
from peftreg.registry.catalog import manifests, tags
from peftreg.registry.catalog.repositories import find_repository
from peftreg.registry.errors import DeleteUnsupported, TagImmutable


def delete_reference(
    session: Session, *, principal: Principal, repository: str, reference: str
) -> None:
    """Delete a tag, or a version by digest, per the distribution spec."""
    try:
        if manifests.is_digest(reference):
            manifests.delete_manifest(
                session, principal=principal, repository=repository, digest=reference, force=True
            )
            return
        repo = find_repository(session, name=repository)
        tags.delete_tag(session, principal=principal, repository=repo, tag=reference)
    except TagImmutable as exc:
        raise DeleteUnsupported(
            f"{exc.message} (immutable release tags cannot be deleted through the OCI API; "
            "change the repository's tag policy first)",
            detail=exc.detail,
        ) from None
