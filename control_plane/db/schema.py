"""Tables (SQLAlchemy Core). Changing one means adding an Alembic migration beside it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


stores = sa.Table(
    "stores",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("region", sa.String(64), nullable=True),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("config_revision", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

enrollment_tokens = sa.Table(
    "enrollment_tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("store_id", sa.String(64), sa.ForeignKey("stores.id"), nullable=False, index=True),
    sa.Column("role", sa.String(64), nullable=True),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("max_uses", sa.Integer, nullable=False),
    sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Set for a re-enrollment token: it may only re-issue this device's identity.
    sa.Column("device_id", sa.String(64), nullable=True),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("store_id", sa.String(64), sa.ForeignKey("stores.id"), nullable=False, index=True),
    sa.Column("role", sa.String(64), nullable=True),
    sa.Column("model", sa.String(200), nullable=False, server_default=""),
    sa.Column("serial", sa.String(200), nullable=False, server_default=""),
    sa.Column("os", sa.String(200), nullable=False, server_default=""),
    sa.Column("hostname", sa.String(200), nullable=False, server_default=""),
    sa.Column("agent_version", sa.String(200), nullable=False, server_default=""),
    sa.Column("enrolled_at", UTCDateTime, nullable=False),
    sa.Column("last_seen_at", UTCDateTime, nullable=True),
    sa.Column("online", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("desired_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("desired_hash", sa.String(64), nullable=True),
    sa.Column("applied_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("apply_status", sa.String(16), nullable=True),
    sa.Column("apply_reason", sa.String(64), nullable=True),
    sa.Column("apply_detail", sa.String(1000), nullable=True),
    sa.Column("apply_reported_at", UTCDateTime, nullable=True),
    sa.Column("health", sa.JSON, nullable=True),
    sa.Column("health_at", UTCDateTime, nullable=True),
    sa.Column("health_seq", sa.BigInteger, nullable=True),
    sa.Column("cert_serial", sa.String(64), nullable=True),
    sa.Column("cert_not_after", UTCDateTime, nullable=True),
    # active | revoked | decommissioned
    sa.Column("state", sa.String(16), nullable=False, server_default="active"),
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False, index=True),
    sa.Column("not_before", UTCDateTime, nullable=False),
    sa.Column("not_after", UTCDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # enroll | renew | reenroll
    sa.Column("issued_by", sa.String(16), nullable=False, server_default="enroll"),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column("revocation_reason", sa.String(64), nullable=True),
)

desired_states = sa.Table(
    "desired_states",
    metadata,
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("document", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False, index=True),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(64), nullable=False, index=True),
    sa.Column("target", sa.String(200), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("source", sa.String(200), nullable=True),
    sa.Column("detail", sa.JSON, nullable=False),
)
