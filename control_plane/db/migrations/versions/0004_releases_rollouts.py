"""releases and staged rollouts: releases, rollouts, rollout devices, the release layer,
rollout events, leader leases

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.db.schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BIGINT_PK = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("notes", sa.String(4000), nullable=False, server_default=""),
        sa.Column("layer", sa.JSON, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("release_id", sa.String(64), sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("selector", sa.JSON, nullable=False),
        sa.Column("plan", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("current_wave", sa.Integer, nullable=False, server_default="0"),
        sa.Column("wave_started_at", UTCDateTime, nullable=True),
        sa.Column("failures_accepted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("start_at", UTCDateTime, nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_rollouts_release_id", "rollouts", ["release_id"])
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("store_id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("previous_version", sa.Integer, nullable=True),
        sa.Column("target_version", sa.Integer, nullable=True),
        sa.Column("sent_at", UTCDateTime, nullable=True),
        sa.Column("applied_at", UTCDateTime, nullable=True),
        sa.Column("settled_at", UTCDateTime, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_rollout_devices_device_id", "rollout_devices", ["device_id"])
    op.create_table(
        "device_releases",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("release_id", sa.String(64), sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "rollout_events",
        sa.Column("id", _BIGINT_PK, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_rollout_events_rollout_id", "rollout_events", ["rollout_id", "id"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    for table in ("leases", "rollout_events", "device_releases", "rollout_devices", "rollouts", "releases"):
        op.drop_table(table)
