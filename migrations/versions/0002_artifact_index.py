"""Artifact index: what search filters on for adapter and base artifacts.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02 00:00:00

Written by hand to match `ArtifactIndex` in registry/db/models.py, names
included (the metadata's naming convention).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXED = ("kind", "base_fingerprint", "max_rank", "base_quantization", "fingerprint")


def upgrade() -> None:
    op.create_table(
        "artifact_index",
        sa.Column("manifest_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("base_fingerprint", sa.String(length=150), nullable=True),
        sa.Column("base_structure_hash", sa.String(length=150), nullable=True),
        sa.Column("max_rank", sa.Integer(), nullable=True),
        sa.Column("base_quantization", sa.String(length=16), nullable=True),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("fingerprint", sa.String(length=150), nullable=True),
        sa.ForeignKeyConstraint(
            ["manifest_id"],
            ["manifests.id"],
            name=op.f("fk_artifact_index_manifest_id_manifests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("manifest_id", name=op.f("pk_artifact_index")),
    )
    for column in INDEXED:
        op.create_index(
            op.f(f"ix_artifact_index_{column}"), "artifact_index", [column], unique=False
        )


def downgrade() -> None:
    for column in reversed(INDEXED):
        op.drop_index(op.f(f"ix_artifact_index_{column}"), table_name="artifact_index")
    op.drop_table("artifact_index")
