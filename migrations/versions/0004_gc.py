"""Garbage collection: `blobs.touched_at`, refreshed by upload, mount and HEAD.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 00:00:00

Written by hand to match `Blob.touched_at` in registry/db/models.py (see
registry/maintenance/gc.py for how the grace period uses it). Existing rows
start from the time of the migration, not from their `created_at`: during a
rolling upgrade, servers still on 0003 go on answering HEADs and mounts
without touching blobs, and an old unreferenced blob a client was just told
exists must not become collectable the moment this runs. That gives a whole
grace period of slack; still, run garbage collection only once every server
runs 0004 (README, Operations).

SQLite cannot add a NOT NULL column whose default is `CURRENT_TIMESTAMP`,
so there the table is recreated (batch mode). `copy_from` describes the
table as revision 0003 left it, so the batch needs no reflection and the
offline SQL (`--sql`) works too.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _now() -> sa.TextClause:
    return sa.text("CURRENT_TIMESTAMP")


def _blobs(*, touched: bool) -> sa.Table:
    """The `blobs` table before (touched=False) or after this revision."""
    columns: list[sa.Column[object]] = [
        sa.Column("digest", sa.String(length=150), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
    ]
    if touched:
        columns.append(
            sa.Column(
                "touched_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False
            )
        )
    table = sa.Table(
        "blobs",
        sa.MetaData(),
        *columns,
        sa.PrimaryKeyConstraint("digest", name="pk_blobs"),
    )
    if touched:
        sa.Index("ix_blobs_touched_at", table.c.touched_at)
    return table


def upgrade() -> None:
    with op.batch_alter_table("blobs", copy_from=_blobs(touched=False)) as batch:
        batch.add_column(
            sa.Column(
                "touched_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False
            )
        )
        batch.create_index(op.f("ix_blobs_touched_at"), ["touched_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("blobs", copy_from=_blobs(touched=True)) as batch:
        batch.drop_index(op.f("ix_blobs_touched_at"))
        batch.drop_column("touched_at")
