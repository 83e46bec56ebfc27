"""Ingest of what devices publish: validate, coalesce, write in batches.

Messages are validated as they arrive (topic, size, JSON, schema, model, and that the
payload's device id is the one in the topic, which the broker's ACL ties to the
certificate identity). Valid ones are coalesced per device — only the newest health report,
reported state and status survive until the next flush — and written with one executemany
per kind, so the database sees batches, not one statement per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import utc_now
from control_plane.db.schema import devices
from protocol.errors import ProtocolError
from protocol.messages import (
    ApplyStatus,
    CommandResult,
    ConnectionState,
    DeviceStatus,
    HealthReport,
    Message,
    RenewalRequest,
    ReportedState,
    decode,
)
from protocol.topics import TopicKind, parse_topic

logger = logging.getLogger(__name__)

# Agent rejections that mean someone tried to push a state the device must not trust.
SECURITY_REJECTIONS = frozenset({"bad_signature", "unknown_signing_key", "wrong_device"})

_MODELS: dict[TopicKind, type[Message]] = {
    TopicKind.REPORTED: ReportedState,
    TopicKind.HEALTH: HealthReport,
    TopicKind.STATUS: DeviceStatus,
    TopicKind.RENEW: RenewalRequest,
    TopicKind.COMMAND_RESULT: CommandResult,
}


class Ingest:
    def __init__(
        self,
        engine: AsyncEngine,
        audit: AuditLog,
        *,
        max_message_bytes: int,
        flush_interval_s: float,
        batch_size: int,
    ) -> None:
        self._engine = engine
        self._audit = audit
        self._max_bytes = max_message_bytes
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._health: dict[str, HealthReport] = {}
        self._reported: dict[str, ReportedState] = {}
        self._status: dict[str, DeviceStatus] = {}
        self._received: dict[tuple[TopicKind, str], datetime] = {}
        self._wakeup = asyncio.Event()
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.coalesced = 0
        self.flushes = 0
        self._on_renewal: Callable[[RenewalRequest], None] | None = None
        self._on_command_result: Callable[[CommandResult], None] | None = None
        self._on_online: Callable[[str], None] | None = None

    def route_renewals(self, handler: Callable[[RenewalRequest], None]) -> None:
        """Hand validated renewal requests (device id = topic id) to `handler`, which must not block."""
        self._on_renewal = handler

    def route_commands(
        self, handler: Callable[[CommandResult], None], *, on_online: Callable[[str], None] | None = None
    ) -> None:
        """Hand validated command results to `handler`, and the ids of devices that say they
        are online to `on_online` (open commands are sent again); neither may block."""
        self._on_command_result = handler
        self._on_online = on_online

    @property
    def pending(self) -> int:
        return len(self._health) + len(self._reported) + len(self._status)

    def handle(self, topic: str, payload: bytes) -> None:
        """Validate one message and buffer it; never raises."""
        try:
            parsed = parse_topic(topic)
            model = _MODELS.get(parsed.kind)
            if model is None:
                raise ProtocolError(f"devices do not publish {parsed.kind.value!r} here")  # noqa: TRY301
            message = decode(model, payload, max_bytes=self._max_bytes)
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            logger.warning("rejected message on %r: %s", topic[:200], exc)
            return
        if getattr(message, "device_id", None) != parsed.device_id:
            self.rejected["device_id_mismatch"] += 1
            self._audit.record_nowait(
                AuditEvent(
                    action="mqtt.identity_mismatch",
                    outcome=Outcome.DENIED,
                    actor=parsed.device_id,
                    detail={"topic": topic, "payload_device_id": str(getattr(message, "device_id", ""))[:64]},
                )
            )
            return
        if isinstance(message, RenewalRequest):
            if self._on_renewal is None:
                self.rejected["renewal_unavailable"] += 1
                return
            self.accepted[parsed.kind.value] += 1
            self._on_renewal(message)
            return
        if isinstance(message, CommandResult):
            if self._on_command_result is None:
                self.rejected["commands_unavailable"] += 1
                return
            self.accepted[parsed.kind.value] += 1
            self._on_command_result(message)
            return
        self.accepted[parsed.kind.value] += 1
        # Liveness and ordering use the time *we* received it: store devices' clocks drift.
        self._received[(parsed.kind, parsed.device_id)] = utc_now()
        if isinstance(message, HealthReport):
            previous = self._health.get(message.device_id)
            if previous is not None:
                self.coalesced += 1
                if previous.seq > message.seq:
                    return
            self._health[message.device_id] = message
        elif isinstance(message, ReportedState):
            self._reported[message.device_id] = message
            if message.status is ApplyStatus.REJECTED and message.reason in SECURITY_REJECTIONS:
                self._audit.record_nowait(
                    AuditEvent(
                        action="desired.rejected_by_device",
                        outcome=Outcome.DENIED,
                        actor=message.device_id,
                        target=message.device_id,
                        detail={
                            "version": message.version,
                            "reason": message.reason,
                            "detail": message.detail,
                        },
                    )
                )
        elif isinstance(message, DeviceStatus):
            self._status[message.device_id] = message
            if message.state is ConnectionState.ONLINE and self._on_online is not None:
                self._on_online(message.device_id)
        if self.pending >= self._batch_size:
            self._wakeup.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:
                logger.exception("ingest flush failed; %d updates kept for the next try", self.pending)

    async def flush(self) -> None:
        health, reported, status = self._health, self._reported, self._status
        if not (health or reported or status):
            return
        received = self._received
        self._health, self._reported, self._status, self._received = {}, {}, {}, {}

        def at(kind: TopicKind, device_id: str) -> datetime:
            return received[(kind, device_id)]

        try:
            async with self._engine.begin() as conn:
                if status:
                    await conn.execute(
                        _update(
                            online=sa.bindparam("b_online"),
                            last_seen_at=sa.bindparam("b_at"),
                        ),
                        [
                            {
                                "b_id": s.device_id,
                                "b_online": s.state is ConnectionState.ONLINE,
                                "b_at": at(TopicKind.STATUS, s.device_id),
                            }
                            for s in status.values()
                        ],
                    )
                if reported:
                    await conn.execute(
                        _update(
                            applied_version=sa.bindparam("b_applied"),
                            apply_status=sa.bindparam("b_status"),
                            apply_reason=sa.bindparam("b_reason"),
                            apply_detail=sa.bindparam("b_detail"),
                            apply_reported_at=sa.bindparam("b_at"),
                            last_seen_at=sa.bindparam("b_at"),
                            online=sa.bindparam("b_online"),
                        ),
                        [
                            {
                                "b_id": r.device_id,
                                "b_applied": r.applied_version,
                                "b_status": r.status.value,
                                "b_reason": r.reason,
                                "b_detail": r.detail,
                                "b_at": at(TopicKind.REPORTED, r.device_id),
                                "b_online": _online_after(
                                    status, received, r.device_id, at(TopicKind.REPORTED, r.device_id)
                                ),
                            }
                            for r in reported.values()
                        ],
                    )
                if health:
                    await conn.execute(
                        _update(
                            health=sa.bindparam("b_health"),
                            health_at=sa.bindparam("b_at"),
                            health_seq=sa.bindparam("b_seq"),
                            last_seen_at=sa.bindparam("b_at"),
                            online=sa.bindparam("b_online"),
                        ),
                        [
                            {
                                "b_id": h.device_id,
                                "b_health": _health_summary(h),
                                "b_at": at(TopicKind.HEALTH, h.device_id),
                                "b_seq": h.seq,
                                "b_online": _online_after(
                                    status, received, h.device_id, at(TopicKind.HEALTH, h.device_id)
                                ),
                            }
                            for h in health.values()
                        ],
                    )
        except Exception:
            # Put back what was not written, unless something newer arrived meanwhile.
            for received_key, when in received.items():
                self._received.setdefault(received_key, when)
            for target, old in ((self._health, health), (self._reported, reported), (self._status, status)):
                for key, value in old.items():
                    target.setdefault(key, value)  # type: ignore[arg-type]
            raise
        self.flushes += 1


def _update(**values: Any) -> sa.Update:
    # A revoked or decommissioned device that is still connected (Mosquitto keeps live sessions
    # until its restart) changes nothing.
    return (
        sa.update(devices)
        .where(devices.c.id == sa.bindparam("b_id"), devices.c.state == "active")
        .values(**values)
    )


def _online_after(
    status: dict[str, DeviceStatus],
    received: dict[tuple[TopicKind, str], datetime],
    device_id: str,
    at: datetime,
) -> bool:
    """A message proves the device online unless an offline status arrived after it in the same batch."""
    latest = status.get(device_id)
    return (
        latest is None
        or latest.state is ConnectionState.ONLINE
        or received[(TopicKind.STATUS, device_id)] < at
    )


def _health_summary(report: HealthReport) -> dict[str, Any]:
    return {
        "seq": report.seq,
        "cpu_percent": report.cpu_percent,
        "memory_percent": report.memory_percent,
        "disk_percent": report.disk_percent,
        "uptime_s": report.uptime_s,
        "applied_version": report.applied_version,
        "healthy": report.healthy,
    }
