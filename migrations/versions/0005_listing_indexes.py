"""Listing indexes: a version's tags and a repository's versions, newest first.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 00:00:00

Written by hand to match the indexes declared in registry/db/models.py.

- `tags (repository_id, manifest_digest, name)`: the tags of one version,
  in name order, straight from the index. Without it SQLite chose the
  `(repository_id, name)` unique index and scanned every tag of the
  repository for each version shown (FINDINGS.md, cause 1).
- `manifests (repository_id, id)`: a repository's versions newest first as
  a keyset page (`id < cursor ORDER BY id DESC LIMIT n`) without a sort,
  on PostgreSQL too (SQLite's single-column index already ends in the rowid).

Both are plain CREATE INDEX; on a large PostgreSQL table create them
`CONCURRENTLY` by hand before upgrading if writes must not wait.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_tags_repository_digest_name",
        "tags",
        ["repository_id", "manifest_digest", "name"],
    )
    op.create_index("ix_manifests_repository_newest", "manifests", ["repository_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_manifests_repository_newest", table_name="manifests")
    op.drop_index("ix_tags_repository_digest_name", table_name="tags")
