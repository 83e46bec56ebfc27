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
    # The template (and its version) the store was created from; None for a hand-made store.
    sa.Column("template_id", sa.String(64), nullable=True),
    sa.Column("template_version", sa.Integer, nullable=True),
    # {"mon": [["08:00", "20:00"]], …} in the store's local time; None: always trading.
    sa.Column("trading_hours", sa.JSON, nullable=True),
    # provisioning | ready | degraded | offline | decommissioned (derived from its devices)
    sa.Column("status", sa.String(16), nullable=False, server_default="ready"),
    sa.Column("status_changed_at", UTCDateTime, nullable=True),
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
    # The device layer of the configuration ({"config", "policies", "checks"}), None if none.
    sa.Column("overrides", sa.JSON, nullable=True),
    sa.Column("overrides_revision", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_seen_at", UTCDateTime, nullable=True),
    # healthy | unhealthy | unknown: the last report's verdict, for filters and roll-ups.
    sa.Column("health_status", sa.String(16), nullable=False, server_default="unknown"),
    sa.Column("health_dropped", sa.BigInteger, nullable=False, server_default="0"),
)

device_tags = sa.Table(
    "device_tags",
    metadata,
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("tag", sa.String(64), primary_key=True, index=True),
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


# --- fleet model (issue 4) --------------------------------------------------------------

templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("current_version", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("archived_at", UTCDateTime, nullable=True),
)

# Immutable: a change to a template is a new version; stores keep the version they use.
template_versions = sa.Table(
    "template_versions",
    metadata,
    sa.Column("template_id", sa.String(64), sa.ForeignKey("templates.id"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    # {"description", "manifest": {role: count}, "roles": {role: layer}, "timezone", "trading_hours"}
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
)

# The persisted provisioning saga of a store (one row per store; see control_plane.provisioning).
store_provisioning = sa.Table(
    "store_provisioning",
    metadata,
    sa.Column("store_id", sa.String(64), sa.ForeignKey("stores.id"), primary_key=True),
    sa.Column("state", sa.String(24), nullable=False),
    # {role: count} the store must have before it is ready
    sa.Column("expected", sa.JSON, nullable=False),
    # ids of the enrollment tokens the saga issued (revoked on cancel)
    sa.Column("token_ids", sa.JSON, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("deadline_at", UTCDateTime, nullable=True),
    sa.Column("ready_at", UTCDateTime, nullable=True),
    sa.Column("seconds_to_ready", sa.Float, nullable=True),
    sa.Column("error", sa.String(1000), nullable=True),
    # {device_id: ["enrolled", "configured", "healthy"]}: milestones already on the timeline
    sa.Column("progress", sa.JSON, nullable=True),
)

# A store's timeline: provisioning steps, status changes, operator actions.
store_events = sa.Table(
    "store_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("store_id", sa.String(64), nullable=False, index=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
)

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    # static (explicit members) | dynamic (members are the devices matching `selector`)
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("selector", sa.JSON, nullable=True),
    # This group's configuration layer ({"config", "policies", "checks"}).
    sa.Column("layer", sa.JSON, nullable=False),
    # Lower applies first; equal priorities apply in id order (deterministic).
    sa.Column("priority", sa.Integer, nullable=False, server_default="100"),
    sa.Column("revision", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

group_members = sa.Table(
    "group_members",
    metadata,
    sa.Column("group_id", sa.String(64), sa.ForeignKey("groups.id"), primary_key=True),
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True, index=True),
    sa.Column("added_at", UTCDateTime, nullable=False),
)

# Answers to POSTs made with an Idempotency-Key, replayed for a retry of the same request.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("actor", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("path", sa.String(500), nullable=False),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("response", sa.JSON, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False, index=True),
)

# Recent health reports per device (retention: control_plane.settings.health_retention_hours).
health_history = sa.Table(
    "health_history",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("store_id", sa.String(64), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False, index=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("healthy", sa.Boolean, nullable=False),
    sa.Column("cpu_percent", sa.Float, nullable=False),
    sa.Column("memory_percent", sa.Float, nullable=False),
    sa.Column("disk_percent", sa.Float, nullable=False),
    sa.Column("checks", sa.JSON, nullable=True),
    sa.Index("ix_health_history_device_at", "device_id", "at"),
)

commands = sa.Table(
    "commands",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False, index=True),
    sa.Column("name", sa.String(32), nullable=False),
    sa.Column("args", sa.JSON, nullable=False),
    # queued | sent | succeeded | failed | expired | rejected
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(64), nullable=True),
    sa.Column("detail", sa.String(1000), nullable=True),
    sa.Column("output", sa.JSON, nullable=True),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Column("completed_at", UTCDateTime, nullable=True),
    # collect_logs: where the uploaded archive is kept, and its size
    sa.Column("artifact_path", sa.String(500), nullable=True),
    sa.Column("artifact_bytes", sa.BigInteger, nullable=True),
    sa.Column("artifact_sha256", sa.String(64), nullable=True),  # of the stored file (migration 0005)
)

# --- releases and rollouts (migration 0004) ----------------------------------------------

# An immutable configuration change: a ConfigLayer ({"config", "policies", "checks"}).
releases = sa.Table(
    "releases",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("notes", sa.String(4000), nullable=False, server_default=""),
    sa.Column("layer", sa.JSON, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("release_id", sa.String(64), sa.ForeignKey("releases.id"), nullable=False, index=True),
    sa.Column("selector", sa.JSON, nullable=False),
    sa.Column("plan", sa.JSON, nullable=False),
    # scheduled | running | paused | completed | aborted | rolling_back | rolled_back
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.String(500), nullable=True),
    sa.Column("current_wave", sa.Integer, nullable=False, server_default="0"),
    sa.Column("wave_started_at", UTCDateTime, nullable=True),
    # Failures an operator accepted by resuming after a pause: the threshold counts from here.
    sa.Column("failures_accepted", sa.Integer, nullable=False, server_default="0"),
    # The wave through which an operator resumed a rollout that had paused for lack of evidence
    # (every device so far skipped): it may advance past them without (migration 0005).
    sa.Column("evidence_waived_wave", sa.Integer, nullable=True),
    # Orders release layers on a device that is in several rollouts (higher applies later).
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("start_at", UTCDateTime, nullable=True),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
)

# One row per targeted device: its wave and where it is in the rollout's state machine.
rollout_devices = sa.Table(
    "rollout_devices",
    metadata,
    sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), primary_key=True),
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True, index=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("store_id", sa.String(64), nullable=False),
    sa.Column("role", sa.String(64), nullable=True),
    # queued | deferred | sent | applied | healthy | failed | timed_out | skipped | rolled_back
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(200), nullable=True),
    sa.Column("previous_version", sa.Integer, nullable=True),
    sa.Column("target_version", sa.Integer, nullable=True),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Column("applied_at", UTCDateTime, nullable=True),
    sa.Column("settled_at", UTCDateTime, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# The release layer: which releases are in force on a device (assembly appends them last).
device_releases = sa.Table(
    "device_releases",
    metadata,
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("rollout_id", sa.String(64), sa.ForeignKey("rollouts.id"), primary_key=True),
    sa.Column("release_id", sa.String(64), sa.ForeignKey("releases.id"), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
)

rollout_events = sa.Table(
    "rollout_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("rollout_id", sa.String(64), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Index("ix_rollout_events_rollout_id", "rollout_id", "id"),
)

# Leader leases with a fencing token: one replica drives rollouts; its writes check the token.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)
