"""`AgentSettings`: every knob of the agent, from the environment (``STOREFLEET_AGENT_*``) or
from arguments. Built once by the CLI (or the simulator) and passed down; never a module global.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STATE_DIR = Path("/var/lib/storefleet-agent")


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STOREFLEET_AGENT_", extra="ignore", frozen=True)

    # Where the agent keeps its database, key and certificates (0700 directory).
    state_dir: Path = DEFAULT_STATE_DIR
    # Where `FileConfigHandler` writes config.json and policies.json; default state_dir/config.
    config_dir: Path | None = None

    # Enrollment defaults (the CLI flags win). The token is single-use and never logged.
    server_url: str | None = None
    token: SecretStr | None = None
    ca_file: Path | None = None
    ca_fingerprint: str | None = None

    # Overrides of the broker endpoint received at enrollment (NAT, containers, tests).
    broker_host: str | None = None
    broker_port: int | None = Field(default=None, ge=1, le=65535)

    # None: use the interval the control plane handed out at enrollment.
    health_interval_s: float | None = Field(default=None, gt=0)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    keepalive_s: int = Field(default=30, ge=5, le=65535)
    # How often the MQTT client's housekeeping runs (keep-alive pings, acknowledgement
    # timeouts). Once a second costs nothing for one agent; thousands of simulated agents in
    # one process set it to a fraction of the keep-alive instead.
    mqtt_housekeeping_s: float = Field(default=1.0, gt=0)
    # TCP connect + TLS handshake, then CONNACK.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # SUBACK / PUBACK waits, and the offline status published on shutdown.
    mqtt_timeout_s: float = Field(default=10.0, gt=0)
    http_timeout_s: float = Field(default=15.0, gt=0)
    probe_timeout_s: float = Field(default=5.0, gt=0)

    # Health outbox (agent/state.py): reports wait here while offline; beyond this many the
    # oldest are dropped (and counted in the next report's `dropped`).
    health_outbox_max: int = Field(default=1000, ge=1)
    # A backlog is sent in batches of this many (QoS 1), with a pause between batches.
    health_backlog_batch: int = Field(default=50, ge=1)
    health_backlog_pause_s: float = Field(default=0.2, ge=0)

    # Post-apply check (agent/checks.py): the new document's app checks run after this grace
    # (the store apps pick up the new configuration), up to `post_apply_attempts` times,
    # `post_apply_retry_s` apart; still failing → reverted to last-known-good.
    post_apply_grace_s: float = Field(default=1.0, ge=0)
    post_apply_attempts: int = Field(default=3, ge=1)
    post_apply_retry_s: float = Field(default=1.0, ge=0)
    # Fault injection for crash-safety tests: pause after each file step of an apply. Keep 0.
    apply_step_delay_s: float = Field(default=0.0, ge=0)

    # Certificate renewal (agent/renewal.py): at `renew_at_fraction` of the certificate's life,
    # give or take `renew_jitter_fraction` of it (drawn once per certificate), so that a fleet
    # enrolled together does not renew together.
    renew_at_fraction: float = Field(default=2 / 3, gt=0, lt=1)
    renew_jitter_fraction: float = Field(default=0.05, ge=0, lt=0.5)
    # Wait for the answer; the same request is sent up to `renewal_attempts` times.
    renewal_timeout_s: float = Field(default=30.0, gt=0)
    renewal_attempts: int = Field(default=3, ge=1)
    # After a failure without a hint from the control plane: backoff between these bounds.
    renewal_retry_min_s: float = Field(default=60.0, gt=0)
    renewal_retry_max_s: float = Field(default=3600.0, gt=0)
    # With an expired certificate the agent does not connect; it looks for re-enrolled
    # credentials this often.
    expired_recheck_s: float = Field(default=60.0, gt=0)

    # Operator commands (agent/commands.py). `reboot`: this command line is run (no shell)
    # after the result is published. `collect_logs`: the newest lines of `log_file` when the
    # agent logs to a file, else of the journal of `journal_unit`; each source is capped at
    # `collect_logs_max_bytes` before compression (the control plane takes 5 MiB by default).
    reboot_command: str = "systemctl reboot"
    journal_unit: str = "storefleet-agent"
    collect_logs_max_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Also write the log to this file (and collect_logs reads it from there).
    log_file: Path | None = None

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @property
    def config_path(self) -> Path:
        return self.config_dir if self.config_dir is not None else self.state_dir / "config"

    @field_validator("server_url")
    @classmethod
    def _https_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("https://"):
            raise ValueError("the control plane URL must use https:// (enrollment sends a secret token)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _backoff_bounds(self) -> Self:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.renewal_retry_max_s < self.renewal_retry_min_s:
            raise ValueError("renewal_retry_max_s must be >= renewal_retry_min_s")
        spread = self.renew_jitter_fraction
        if self.renew_at_fraction - spread <= 0 or self.renew_at_fraction + spread >= 1:
            raise ValueError("renew_at_fraction ± renew_jitter_fraction must stay within (0, 1)")
        if self.ca_file is not None and self.ca_fingerprint is not None:
            raise ValueError("set either ca_file or ca_fingerprint, not both")
        return self
