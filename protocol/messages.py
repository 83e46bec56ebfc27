"""Pydantic models of every message on the wire, and the one way to decode them.

Enrollment travels over HTTPS; everything else over MQTT (see `protocol.topics`). All
timestamps are UTC, ISO 8601. Every message has `schema` (see `protocol.versions`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.errors import InvalidMessage
from protocol.topics import DEVICE_ID_PATTERN, STORE_ID_PATTERN
from protocol.versions import SCHEMA_VERSION, check_schema

# Anything larger is refused by the broker configuration and by every receiver.
MAX_MESSAGE_BYTES = 256 * 1024
# Configuration documents are shallow; anything deeper is refused before it is processed.
MAX_NESTING_DEPTH = 32

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
# Chosen by the device per renewal attempt; a re-sent request keeps it (idempotency key).
RequestId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
StoreId = Annotated[str, Field(pattern=STORE_ID_PATTERN)]
ShortText = Annotated[str, Field(max_length=200)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Base of every wire message: unknown fields are ignored (additive evolution)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_: int = Field(default=SCHEMA_VERSION, alias="schema", ge=1)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @field_validator("schema_")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        # `decode` raises UnsupportedSchema before validation; this covers direct construction
        # (and HTTP bodies), where pydantic needs a ValueError to report the field.
        if value > SCHEMA_VERSION:
            raise ValueError(
                f"schema {value} is not supported (this build understands up to {SCHEMA_VERSION})"
            )
        return value


# --- enrollment (HTTPS) ---------------------------------------------------------------


class DeviceInfo(BaseModel):
    """What the device says about itself. Informational: identity comes from the control plane."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    hostname: ShortText = ""
    model: ShortText = ""
    serial: ShortText = ""
    os: ShortText = ""
    agent_version: ShortText = ""
    role: ShortText | None = None


class EnrollmentRequest(Message):
    token: Annotated[str, Field(min_length=16, max_length=256)]
    csr_pem: Annotated[str, Field(min_length=64, max_length=16_384)]
    device: DeviceInfo = DeviceInfo()


class BrokerEndpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str
    port: Annotated[int, Field(ge=1, le=65535)]


class SigningKey(BaseModel):
    """A config-signing public key the agent pins at enrollment."""

    model_config = ConfigDict(frozen=True)

    kid: str
    algorithm: Literal["ES256"] = "ES256"
    public_key_pem: str


class EnrollmentResponse(Message):
    device_id: DeviceId
    store_id: StoreId
    certificate_pem: str
    ca_chain_pem: str
    broker: BrokerEndpoint
    signing_keys: list[SigningKey]
    health_interval_s: Annotated[float, Field(gt=0)] = 30.0


# --- MQTT ----------------------------------------------------------------------------


CheckName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]


class AppCheckKind(StrEnum):
    PROCESS = "process"  # a process with this name is running
    TCP = "tcp"  # "host:port" accepts a TCP connection
    HTTP = "http"  # the URL answers with `expect_status`


class AppCheck(BaseModel):
    """An application check the agent runs every `interval_s` (declared in the desired state)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: AppCheckKind
    target: Annotated[str, Field(min_length=1, max_length=500)]
    interval_s: Annotated[float, Field(ge=1, le=86_400)] = 30.0
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200

    @model_validator(mode="after")
    def _target_fits_kind(self) -> Self:
        if self.kind is AppCheckKind.TCP:
            host, sep, port = self.target.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError("a tcp check's target is 'host:port'")
        elif self.kind is AppCheckKind.HTTP and not self.target.startswith(("http://", "https://")):
            raise ValueError("an http check's target is an http:// or https:// URL")
        return self


class DesiredState(Message):
    """The signed desired state of one device. `sig` covers the canonical JSON of the rest.

    `checks`: app checks by name (merge-patch friendly: a layer adds, changes or removes one
    check by name). `signing_keys`: during a config-signing key rotation, every key the
    device should trust from now on (kid → public key PEM); the agent adopts the set only
    from a document whose signature it verified with a key it already pins.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    device_id: DeviceId
    store_id: StoreId
    version: Annotated[int, Field(ge=1)]
    issued_at: datetime
    config: dict[str, Any] = Field(default_factory=dict)
    policies: dict[str, Any] = Field(default_factory=dict)
    checks: dict[CheckName, AppCheck] = Field(default_factory=dict)
    signing_keys: dict[str, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict)
    kid: str = ""
    sig: str = ""


class ApplyStatus(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"  # refused before apply: bad signature, old version, wrong device…
    FAILED = "failed"  # apply attempted and reverted to last-known-good


class ReportedState(Message):
    device_id: DeviceId
    version: Annotated[int, Field(ge=0)]
    status: ApplyStatus
    reason: Annotated[str, Field(max_length=64)] | None = None
    detail: Annotated[str, Field(max_length=1000)] | None = None
    applied_version: Annotated[int, Field(ge=0)] = 0
    at: datetime = Field(default_factory=utc_now)


class CheckResult(BaseModel):
    """The latest outcome of one app check."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: CheckName
    ok: bool
    detail: Annotated[str, Field(max_length=200)] = ""
    at: datetime = Field(default_factory=utc_now)


class HealthReport(Message):
    """`healthy` is false when a probe limit is crossed or any app check fails.

    Reports made while offline wait in the agent's outbox and arrive later with their own
    `at` and `seq`; `dropped` counts reports the bounded outbox had to discard since the
    previous report that was sent.
    """

    device_id: DeviceId
    seq: Annotated[int, Field(ge=0)]
    at: datetime = Field(default_factory=utc_now)
    cpu_percent: Annotated[float, Field(ge=0, le=100)]
    memory_percent: Annotated[float, Field(ge=0, le=100)]
    disk_percent: Annotated[float, Field(ge=0, le=100)]
    uptime_s: Annotated[float, Field(ge=0)]
    applied_version: Annotated[int, Field(ge=0)] = 0
    healthy: bool = True
    checks: Annotated[list[CheckResult], Field(max_length=64)] = Field(default_factory=list)
    dropped: Annotated[int, Field(ge=0)] = 0


class ConnectionState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class DeviceStatus(Message):
    device_id: DeviceId
    state: ConnectionState
    at: datetime = Field(default_factory=utc_now)
    agent_version: ShortText = ""


class RenewalRequest(Message):
    """A device asks for a new certificate for a new key, over its own mTLS session.

    Published on ``sf/v1/dev/{device_id}/renew``; the broker confines a device to its own
    topics, so the topic's device id is the authenticated identity. The CSR's subject is
    ignored, as at enrollment.
    """

    device_id: DeviceId
    request_id: RequestId
    csr_pem: Annotated[str, Field(min_length=64, max_length=16_384)]


class RenewalStatus(StrEnum):
    ISSUED = "issued"
    REFUSED = "refused"


class RenewalResponse(Message):
    """The answer on ``sf/v1/dev/{device_id}/renew/result`` (QoS 1, not retained).

    `issued`: `certificate_pem` (for the CSR's key), `ca_chain_pem`, `not_after`.
    `refused`: `reason` (``csr_rejected``, ``csr_bad_signature``, ``csr_weak_key``,
    ``rate_limited``, ``ca_unavailable``, ``device_not_active``, ``certificate_revoked``,
    ``device_unknown``, ``request_id_conflict``) and, when trying again later can help,
    `retry_after_s`.
    """

    device_id: DeviceId
    request_id: RequestId
    status: RenewalStatus
    certificate_pem: Annotated[str, Field(max_length=16_384)] | None = None
    ca_chain_pem: Annotated[str, Field(max_length=65_536)] | None = None
    not_after: datetime | None = None
    reason: Annotated[str, Field(max_length=64)] | None = None
    retry_after_s: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.status is RenewalStatus.ISSUED and (self.certificate_pem is None or self.not_after is None):
            raise ValueError("an issued renewal carries certificate_pem and not_after")
        if self.status is RenewalStatus.REFUSED and not self.reason:
            raise ValueError("a refused renewal carries a reason")
        return self


# --- operator commands (MQTT) ----------------------------------------------------------


class CommandName(StrEnum):
    PING = "ping"
    REBOOT = "reboot"
    COLLECT_LOGS = "collect_logs"
    ROTATE_CERTIFICATE = "rotate_certificate"


class Command(Message):
    """An operator command on ``sf/v1/dev/{device_id}/cmd`` (QoS 1, not retained).

    Signed like a desired state (`sig` over the canonical JSON of the rest, by a pinned
    key). `command_id` is the idempotency key: a device runs a command id once and answers
    a re-delivery with the stored result. A command received after `expires_at` is not run
    (answered `expired`).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    device_id: DeviceId
    command_id: RequestId
    name: CommandName
    args: dict[str, Any] = Field(default_factory=dict)
    issued_at: datetime
    expires_at: datetime
    kid: str = ""
    sig: str = ""


class CommandStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"  # arrived after expires_at: not run
    REJECTED = "rejected"  # bad signature, wrong device, unknown command: not run


class CommandResult(Message):
    """The answer on ``sf/v1/dev/{device_id}/cmd/result`` (QoS 1)."""

    device_id: DeviceId
    command_id: RequestId
    status: CommandStatus
    reason: Annotated[str, Field(max_length=64)] | None = None
    detail: Annotated[str, Field(max_length=1000)] | None = None
    output: dict[str, Any] = Field(default_factory=dict)
    at: datetime = Field(default_factory=utc_now)


M = TypeVar("M", bound=BaseModel)


def parse_object(payload: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """A JSON object from untrusted bytes: bounded in size and in nesting depth.

    The depth bound keeps every later step (validation, canonical JSON, merge patch) far from
    Python's recursion limit: a small but deeply nested payload must be an `InvalidMessage`,
    not a `RecursionError` escaping into whoever handles the message.
    """
    raw = payload.encode() if isinstance(payload, str) else payload
    if len(raw) > max_bytes:
        raise InvalidMessage(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage(f"payload is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidMessage(f"payload nests deeper than {MAX_NESTING_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise InvalidMessage("payload must be a JSON object")
    _check_depth(data)
    return data


def _check_depth(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING_DEPTH:
            raise InvalidMessage(f"payload nests deeper than {MAX_NESTING_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def decode(model: type[M], payload: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode a payload into `model`, with one error type for every way it can be wrong.

    Size is checked before parsing; the schema number before the model, so that a newer
    peer gets `UnsupportedSchema` rather than a confusing field error.
    """
    return validate(model, parse_object(payload, max_bytes=max_bytes))


def validate(model: type[M], data: dict[str, Any]) -> M:
    if issubclass(model, Message):
        check_schema(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise InvalidMessage(f"field {field!r}: {first['msg']}") from None
