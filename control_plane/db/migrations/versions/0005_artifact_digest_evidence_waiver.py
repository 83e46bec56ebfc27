"""command artifacts keep their SHA-256; rollouts remember an operator's waiver of evidence

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.add_column(sa.Column("artifact_sha256", sa.String(64), nullable=True))
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("evidence_waived_wave", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("evidence_waived_wave")
    with op.batch_alter_table("commands") as batch:
        batch.drop_column("artifact_sha256")
