"""certificate lifecycle: renewal, revocation, re-enrollment, device state

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("issued_by", sa.String(16), nullable=False, server_default="enroll"))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revocation_reason", sa.String(64), nullable=True))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="active"))
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.add_column(sa.Column("device_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_column("device_id")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("state")
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("revocation_reason")
        batch.drop_column("revoked_at")
        batch.drop_column("issued_by")
