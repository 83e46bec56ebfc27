"""Control-plane settings: one class, built once in the CLI or `create_app` and passed down.

Every value can come from a flag of `storefleet serve` or an environment variable with the
`STOREFLEET_` prefix (e.g. `STOREFLEET_DATABASE_URL`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from control_plane.pki.identity import REPLICA_ID_PATTERN
from protocol.messages import MAX_MESSAGE_BYTES


class ControlPlaneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STOREFLEET_", extra="ignore")

    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    mqtt_port: int = Field(default=8883, ge=0, le=65535)
    # Host names/IPs put in the server certificates and handed to agents as the broker address.
    public_host: str | None = None

    database_url: str | None = None  # default: sqlite+aiosqlite:///<data_dir>/storefleet.db
    broker_url: str | None = None  # default: the embedded amqtt broker on mqtt_port

    admin_key: SecretStr | None = None
    trust_domain: str = "storefleet.local"
    device_cert_validity_hours: float = Field(default=72.0, gt=0)
    default_token_ttl_hours: float = Field(default=24.0, gt=0)
    health_interval_s: float = Field(default=30.0, gt=0)
    # A device not heard from for this many health intervals is shown offline.
    offline_after_intervals: float = Field(default=3.0, gt=1)
    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, gt=0)
    ingest_flush_interval_s: float = Field(default=0.5, gt=0)
    ingest_batch_size: int = Field(default=500, gt=0)
    mqtt_reconnect_max_s: float = Field(default=10.0, gt=0)
    # Health jobs (control_plane.health): staleness sweep, store status roll-up, history retention.
    health_sweep_interval_s: float = Field(default=10.0, gt=0)
    store_rollup_interval_s: float = Field(default=10.0, gt=0)
    # A device that has not applied its current desired version after this long degrades its store.
    store_sync_grace_s: float = Field(default=300.0, ge=0)
    health_retention_hours: float = Field(default=24.0, gt=0)
    health_retention_interval_s: float = Field(default=300.0, gt=0)
    health_retention_batch: int = Field(default=5000, gt=0)
    # An external Mosquitto's log file: its TLS refusals are copied into the audit log.
    broker_log_file: Path | None = None
    # Operator API keys are checked against an in-memory snapshot at most this old: a key
    # deleted or replaced in the database stops working within it (a new key works at once).
    api_key_cache_s: float = Field(default=5.0, ge=0)
    # /v1/enroll token bucket per client address.
    enroll_rate_per_source_s: float = Field(default=20.0, gt=0)
    enroll_burst_per_source: int = Field(default=200, ge=1)
    # Certificate renewal over MQTT: at most one certificate per device per interval; the
    # retry hint when the CA cannot sign; queue between the MQTT ingest and the workers.
    renewal_min_interval_s: float = Field(default=300.0, ge=0)
    renewal_ca_retry_after_s: float = Field(default=60.0, gt=0)
    renewal_queue_size: int = Field(default=1000, gt=0)
    renewal_workers: int = Field(default=2, ge=1)
    log_format: str = Field(default="text", pattern="^(text|json)$")
    # Operator commands (control_plane/commands): default and longest time to live; how often
    # expired ones are closed and undelivered ones sent again; a sent command still without a
    # result is sent again after this long (the agent answers a repeat from its record);
    # the largest log archive a device may upload.
    command_default_ttl_s: float = Field(default=600.0, gt=0)
    command_max_ttl_s: float = Field(default=7 * 86_400.0, gt=0)
    command_sweep_interval_s: float = Field(default=5.0, gt=0)
    command_resend_after_s: float = Field(default=60.0, gt=0)
    artifact_max_bytes: int = Field(default=5 * 1024 * 1024, gt=0)
    # Rollouts: how often the driver evaluates them; the leader lease's time to live (a new
    # replica takes over this long after the leader dies); whether this replica may drive.
    rollout_tick_s: float = Field(default=1.0, gt=0)
    rollout_lease_ttl_s: float = Field(default=10.0, gt=0)
    rollout_driver: bool = True
    # Provisioning: a store not ready this long after creation fails (and is compensated);
    # the saga worker looks at its devices' progress this often (and on every enrollment).
    provisioning_timeout_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    provisioning_interval_s: float = Field(default=0.5, gt=0)
    # Several replicas on one broker and one PostgreSQL (docs/running.md "Several replicas"):
    # this replica's MQTT identity is storefleet-control-plane-<replica_id>, and it shares the
    # device messages with the others through MQTT shared subscriptions.
    replica_id: str | None = Field(default=None, pattern=REPLICA_ID_PATTERN)

    # Certificate authority (docs/security.md "CA backends"). The built-in CA always issues the
    # server and control-plane certificates; `ca_backend` chooses who signs device certificates.
    ca_backend: Literal["builtin", "vault"] = "builtin"
    ca_key_passphrase: SecretStr | None = None  # encrypts the built-in CA's key files
    ca_timeout_s: float = Field(default=5.0, gt=0)  # one CA call, end to end
    ca_breaker_failures: int = Field(default=3, ge=1)  # consecutive failures that open the circuit
    ca_breaker_reset_s: float = Field(default=30.0, gt=0)  # open → one trial call after this
    vault_url: str | None = None
    vault_token: SecretStr | None = None
    vault_role_id: str | None = None
    vault_secret_id: SecretStr | None = None
    vault_approle_mount: str = "approle"
    vault_mount: str = "pki"
    vault_role: str = "storefleet-device"
    vault_ca_file: Path | None = None  # CA bundle that verifies Vault's TLS certificate

    @field_validator("broker_url")
    @classmethod
    def _mqtts_only(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme != "mqtts":
            raise ValueError("broker_url must be mqtts://host:port (plain MQTT is not allowed)")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("database_url must be sqlite+aiosqlite://… or postgresql+asyncpg://…")
        return value

    @model_validator(mode="after")
    def _replicas_share_broker_and_database(self) -> Self:
        if self.replica_id is not None and (
            self.broker_url is None or not (self.database_url or "").startswith("postgresql")
        ):
            raise ValueError(
                "replica_id needs an external broker (broker_url) and PostgreSQL (database_url): "
                "replicas share both"
            )
        return self

    @model_validator(mode="after")
    def _safe_vault(self) -> Self:
        if self.ca_backend != "vault":
            return self
        if not self.vault_url:
            raise ValueError("ca_backend 'vault' needs vault_url")
        url = urlsplit(self.vault_url)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ValueError("vault_url must be https://host[:port]")
        if url.scheme == "http" and url.hostname not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("vault_url must use https:// (plain http only to a Vault on this host)")
        if self.vault_ca_file is not None and url.scheme != "https":
            raise ValueError("vault_ca_file is set but vault_url is not https://")
        approle = self.vault_role_id is not None or self.vault_secret_id is not None
        if approle and (not self.vault_role_id or self.vault_secret_id is None):
            raise ValueError("AppRole auth needs both vault_role_id and vault_secret_id")
        if approle == (self.vault_token is not None):
            raise ValueError("ca_backend 'vault' needs vault_token or vault_role_id + vault_secret_id (one)")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir.resolve() / 'storefleet.db'}"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def advertised_host(self) -> str:
        if self.public_host:
            return self.public_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # noqa: S104

    @property
    def broker_endpoint(self) -> tuple[str, int]:
        """Where agents and the control plane reach the broker."""
        if self.broker_url is None:
            return self.advertised_host, self.mqtt_port
        parts = urlsplit(self.broker_url)
        return parts.hostname or "127.0.0.1", parts.port or 8883

    @property
    def device_cert_validity(self) -> timedelta:
        return timedelta(hours=self.device_cert_validity_hours)

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def artifacts_dir(self) -> Path:
        """Files devices uploaded for commands (collect_logs archives), 0600 each."""
        return self.data_dir / "artifacts"
