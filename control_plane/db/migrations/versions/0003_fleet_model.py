"""fleet model: templates, provisioning saga, groups, overrides, tags, idempotency, health
history, commands

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from control_plane.db.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BIGINT_PK = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("stores") as batch:
        batch.add_column(sa.Column("template_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("template_version", sa.Integer, nullable=True))
        batch.add_column(sa.Column("trading_hours", sa.JSON, nullable=True))
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="ready"))
        batch.add_column(sa.Column("status_changed_at", UTCDateTime, nullable=True))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("overrides", sa.JSON, nullable=True))
        batch.add_column(sa.Column("overrides_revision", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("first_seen_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("health_status", sa.String(16), nullable=False, server_default="unknown"))
        batch.add_column(sa.Column("health_dropped", sa.BigInteger, nullable=False, server_default="0"))
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_device_tags_tag", "device_tags", ["tag"])
    op.create_table(
        "templates",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("archived_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "template_versions",
        sa.Column("template_id", sa.String(64), sa.ForeignKey("templates.id"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
    )
    op.create_table(
        "store_provisioning",
        sa.Column("store_id", sa.String(64), sa.ForeignKey("stores.id"), primary_key=True),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("expected", sa.JSON, nullable=False),
        sa.Column("token_ids", sa.JSON, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("deadline_at", UTCDateTime, nullable=True),
        sa.Column("ready_at", UTCDateTime, nullable=True),
        sa.Column("seconds_to_ready", sa.Float, nullable=True),
        sa.Column("error", sa.String(1000), nullable=True),
        sa.Column("progress", sa.JSON, nullable=True),
    )
    op.create_table(
        "store_events",
        sa.Column("id", _BIGINT_PK, primary_key=True, autoincrement=True),
        sa.Column("store_id", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_store_events_store_id", "store_events", ["store_id"])
    op.create_table(
        "groups",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("selector", sa.JSON, nullable=True),
        sa.Column("layer", sa.JSON, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="100"),
        sa.Column("revision", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "group_members",
        sa.Column("group_id", sa.String(64), sa.ForeignKey("groups.id"), primary_key=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("added_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_group_members_device_id", "group_members", ["device_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("actor", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("response", sa.JSON, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])
    op.create_table(
        "health_history",
        sa.Column("id", _BIGINT_PK, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("store_id", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("healthy", sa.Boolean, nullable=False),
        sa.Column("cpu_percent", sa.Float, nullable=False),
        sa.Column("memory_percent", sa.Float, nullable=False),
        sa.Column("disk_percent", sa.Float, nullable=False),
        sa.Column("checks", sa.JSON, nullable=True),
    )
    op.create_index("ix_health_history_at", "health_history", ["at"])
    op.create_index("ix_health_history_device_at", "health_history", ["device_id", "at"])
    op.create_table(
        "commands",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("detail", sa.String(1000), nullable=True),
        sa.Column("output", sa.JSON, nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("sent_at", UTCDateTime, nullable=True),
        sa.Column("completed_at", UTCDateTime, nullable=True),
        sa.Column("artifact_path", sa.String(500), nullable=True),
        sa.Column("artifact_bytes", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_commands_device_id", "commands", ["device_id"])


def downgrade() -> None:
    for table in (
        "commands",
        "health_history",
        "idempotency_keys",
        "group_members",
        "groups",
        "store_events",
        "store_provisioning",
        "template_versions",
        "templates",
        "device_tags",
    ):
        op.drop_table(table)
    with op.batch_alter_table("devices") as batch:
        for column in ("health_dropped", "health_status", "first_seen_at", "overrides_revision", "overrides"):
            batch.drop_column(column)
    with op.batch_alter_table("stores") as batch:
        for column in ("status_changed_at", "status", "trading_hours", "template_version", "template_id"):
            batch.drop_column(column)
