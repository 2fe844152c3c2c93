"""Drop `manifests (repository_id)`: `(repository_id, id)` serves all it did.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 00:00:00

Written by hand to match registry/db/models.py.

Every lookup by `repository_id` alone (listings, the foreign key's cascade)
is served by the leading column of `ix_manifests_repository_newest`. With
both present, PostgreSQL listed a small repository from the single-column
index and sorted it instead of reading `(repository_id, id)` backwards in
keyset order; one index fewer also costs every push one write less.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_manifests_repository_id", table_name="manifests")


def downgrade() -> None:
    op.create_index("ix_manifests_repository_id", "manifests", ["repository_id"])
