"""Ingest of what devices publish: validate, coalesce, write in batches.

Messages are validated as they arrive (topic, size, JSON, schema, model, and that the
payload's device id is the one in the topic, which the broker's ACL ties to the
certificate identity). Valid ones are buffered until the next flush, which writes them with
one statement per kind, so the database sees batches, never one statement per message:

- the device row is coalesced: only the newest status, reported state and health report
  per device survive until the flush (one executemany UPDATE per kind);
- every accepted health report is also appended to `health_history` (a separate batch: COPY
  on PostgreSQL, executemany on SQLite), out-of-order ones included.

Ordering and replays: a health report whose `seq` is not above the device's stored
`health_seq` (a late report) still proves the device alive and still goes to the history,
but it never overwrites the device's latest health. A report delivered twice (a QoS 1
backlog batch sent again after its session dropped) proves the device alive and nothing
else: it is counted (`history_duplicates`), not stored again and its `dropped` not added
again (`control_plane.health.replay`). The history keeps
the device's own `at`, capped at the receive time (a clock running ahead cannot make a
sample look newer than it is). Liveness (`last_seen_at`, `online`) uses the time *we*
received a message, never the device's clock.

A history row needs the device's store; the store of each active device is cached (a device
never changes store) and the cache is dropped every `device_cache_s`, so a revoked device
stops adding history within that time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.aio import wait_event
from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import utc_now
from control_plane.db.schema import UTCDateTime, devices, health_history
from control_plane.health.replay import SeenSequences
from protocol.errors import InvalidMessage, ProtocolError
from protocol.messages import (
    MAX_NESTING_DEPTH,
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

HISTORY_COLUMNS = (
    "device_id",
    "store_id",
    "at",
    "seq",
    "healthy",
    "cpu_percent",
    "memory_percent",
    "disk_percent",
    "checks",
)
# One buffered history row: everything but the store id, which the flush resolves.
_HistoryRow = tuple[str, datetime, int, bool, float, float, float, list[dict[str, Any]] | None]
_LOOKUP_CHUNK = 500

M = TypeVar("M", bound=Message)


def decode_fast(model: type[M], payload: bytes, *, max_bytes: int) -> M:
    """`protocol.messages.decode`, with pydantic's JSON parser on the happy path.

    `model_validate_json` parses and validates in one pass (about twice as fast as
    json.loads + validate). Anything it refuses, and anything it cannot judge the way
    `decode` does (a missing `schema`, a payload with enough brackets to nest deeper than
    the limit), goes through `decode`, which raises the same errors as everywhere else.
    """
    if len(payload) > max_bytes:
        raise InvalidMessage(f"message of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if payload.count(b"{") + payload.count(b"[") <= MAX_NESTING_DEPTH:
        try:
            message = model.model_validate_json(payload)
        except ValidationError:
            pass
        else:
            if "schema_" in message.model_fields_set:
                return message
    return decode(model, payload, max_bytes=max_bytes)


class Ingest:
    def __init__(
        self,
        engine: AsyncEngine,
        audit: AuditLog,
        *,
        max_message_bytes: int,
        flush_interval_s: float,
        batch_size: int,
        max_pending_history: int = 200_000,
        device_cache_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._audit = audit
        self._max_bytes = max_message_bytes
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._max_pending_history = max_pending_history
        self._device_cache_s = device_cache_s
        self._copy = engine.dialect.name == "postgresql"
        self._health: dict[str, HealthReport] = {}
        self._history: list[_HistoryRow] = []
        self._dropped: Counter[str] = Counter()
        self._reported: dict[str, ReportedState] = {}
        self._status: dict[str, DeviceStatus] = {}
        self._received: dict[tuple[TopicKind, str], datetime] = {}
        self._store_of: dict[str, str] = {}
        # Forgotten with the store cache: a device re-enrolled through another replica (its
        # sequence started again) is judged afresh within `device_cache_s`.
        self._seen = SeenSequences()
        self._store_cache_at = time.monotonic()
        self._wakeup = asyncio.Event()
        self._in_flight = 0  # taken by the flush that is writing now
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.coalesced = 0
        self.flushes = 0
        self.history_written = 0
        self.flush_seconds_max = 0.0  # longest flush so far (the event loop is busy for part of it)
        # Reports of devices that are unknown or no longer active: no history row.
        self.history_ignored = 0
        # Reports not kept because the database stayed unavailable and the buffer was full.
        self.history_overflow = 0
        # Reports delivered a second time (same device and seq): not stored again.
        self.history_duplicates = 0
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

    def forget_sequence(self, device_id: str) -> None:
        """The device was re-enrolled: its health sequence may start again."""
        self._seen.forget(device_id)

    @property
    def pending(self) -> int:
        """Buffered updates not yet written (device rows and history rows)."""
        buffered = len(self._health) + len(self._reported) + len(self._status) + len(self._history)
        return buffered + self._in_flight

    def handle(self, topic: str, payload: bytes) -> None:
        """Validate one message and buffer it; never raises."""
        try:
            parsed = parse_topic(topic)
            model = _MODELS.get(parsed.kind)
            if model is None:
                raise ProtocolError(f"devices do not publish {parsed.kind.value!r} here")  # noqa: TRY301
            message = decode_fast(model, payload, max_bytes=self._max_bytes)
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            logger.warning("rejected message on %r: %s", topic[:200], exc)
            return
        device_id = parsed.device_id
        if getattr(message, "device_id", None) != device_id:
            self.rejected["device_id_mismatch"] += 1
            self._audit.record_nowait(
                AuditEvent(
                    action="mqtt.identity_mismatch",
                    outcome=Outcome.DENIED,
                    actor=device_id,
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
        received = utc_now()
        self._received[(parsed.kind, device_id)] = received
        if isinstance(message, HealthReport):
            self._buffer_health(message, received)
        elif isinstance(message, ReportedState):
            self._reported[device_id] = message
            if message.status is ApplyStatus.REJECTED and message.reason in SECURITY_REJECTIONS:
                self._audit.record_nowait(
                    AuditEvent(
                        action="desired.rejected_by_device",
                        outcome=Outcome.DENIED,
                        actor=device_id,
                        target=device_id,
                        detail={
                            "version": message.version,
                            "reason": message.reason,
                            "detail": message.detail,
                        },
                    )
                )
        elif isinstance(message, DeviceStatus):
            self._status[device_id] = message
            if message.state is ConnectionState.ONLINE and self._on_online is not None:
                self._on_online(device_id)
        if (
            max(len(self._history), len(self._health) + len(self._reported) + len(self._status))
            >= self._batch_size
        ):
            self._wakeup.set()

    def _buffer_health(self, report: HealthReport, received: datetime) -> None:
        device_id = report.device_id
        previous = self._health.get(device_id)
        if previous is None:
            self._health[device_id] = report
        else:
            self.coalesced += 1
            if report.seq > previous.seq:
                self._health[device_id] = report
        if not self._seen.first_time(device_id, report.seq):
            self.history_duplicates += 1
            return
        if report.dropped:
            self._dropped[device_id] += report.dropped
        if len(self._history) >= self._max_pending_history:
            self.history_overflow += 1
            return
        at = report.at if report.at.tzinfo is not None else report.at.replace(tzinfo=UTC)
        checks = [_check_json(check) for check in report.checks] if report.checks else None
        self._history.append(
            (
                device_id,
                min(at, received),
                report.seq,
                _is_healthy(report),
                report.cpu_percent,
                report.memory_percent,
                report.disk_percent,
                checks,
            )
        )

    async def run(self) -> None:
        while True:
            await wait_event(self._wakeup, self._flush_interval_s)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:
                logger.exception("ingest flush failed; %d updates kept for the next try", self.pending)

    async def flush(self) -> None:
        health, reported, status = self._health, self._reported, self._status
        history, dropped = self._history, self._dropped
        if not (health or reported or status or history):
            return
        received = self._received
        self._health, self._reported, self._status, self._received = {}, {}, {}, {}
        self._history, self._dropped = [], Counter()

        def at(kind: TopicKind, device_id: str) -> datetime:
            return received[(kind, device_id)]

        # Rows are updated in device-id order, as the publisher does: concurrent batches never
        # lock the same rows in opposite orders (a deadlock on PostgreSQL).
        self._in_flight = len(health) + len(reported) + len(status) + len(history)
        started = time.monotonic()
        try:
            stores_of = await self._stores_of({row[0] for row in history})
            async with self._engine.begin() as conn:
                if status:
                    await conn.execute(
                        _STATUS_UPDATE,
                        [
                            {
                                "b_id": s.device_id,
                                "b_online": s.state is ConnectionState.ONLINE,
                                "b_at": at(TopicKind.STATUS, s.device_id),
                            }
                            for _, s in sorted(status.items())
                        ],
                    )
                if reported:
                    await conn.execute(
                        _REPORTED_UPDATE,
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
                            for _, r in sorted(reported.items())
                        ],
                    )
                if health:
                    await conn.execute(
                        _HEALTH_UPDATE,
                        [
                            {
                                "b_id": h.device_id,
                                "b_health": _health_summary(h),
                                "b_health_status": "healthy" if _is_healthy(h) else "unhealthy",
                                "b_seq": h.seq,
                                "b_dropped": dropped.get(h.device_id, 0),
                                "b_at": at(TopicKind.HEALTH, h.device_id),
                                "b_online": _online_after(
                                    status, received, h.device_id, at(TopicKind.HEALTH, h.device_id)
                                ),
                            }
                            for _, h in sorted(health.items())
                        ],
                    )
                written, ignored = await self._append_history(conn, history, stores_of)
        except BaseException:
            # Put back what was not written (also when cancelled at shutdown: the final flush
            # writes it), unless something newer arrived meanwhile.
            for received_key, when in received.items():
                self._received.setdefault(received_key, when)
            for target, old in ((self._reported, reported), (self._status, status)):
                for key, value in old.items():
                    target.setdefault(key, value)  # type: ignore[arg-type]
            for device_id, report in health.items():
                arrived = self._health.get(device_id)
                if arrived is None or arrived.seq < report.seq:  # a late backlog must not win
                    self._health[device_id] = report
            self._dropped.update(dropped)
            room = max(0, self._max_pending_history - len(self._history))
            self.history_overflow += max(0, len(history) - room)
            self._history = history[len(history) - room :] + self._history if room else self._history
            raise
        finally:
            self._in_flight = 0
        self.flush_seconds_max = max(self.flush_seconds_max, time.monotonic() - started)
        self.history_written += written
        self.history_ignored += ignored
        self.flushes += 1

    async def _stores_of(self, device_ids: set[str]) -> dict[str, str]:
        """device id → store id for the active ones among `device_ids` (cached)."""
        if time.monotonic() - self._store_cache_at > self._device_cache_s:
            self._store_of, self._store_cache_at = {}, time.monotonic()
            self._seen.clear()
        missing = [d for d in device_ids if d not in self._store_of]
        if missing:
            async with self._engine.connect() as conn:
                for start in range(0, len(missing), _LOOKUP_CHUNK):
                    chunk = missing[start : start + _LOOKUP_CHUNK]
                    rows = await conn.execute(
                        sa.select(devices.c.id, devices.c.store_id).where(
                            devices.c.id.in_(chunk), devices.c.state == "active"
                        )
                    )
                    self._store_of.update((row.id, row.store_id) for row in rows)
        return self._store_of

    async def _append_history(
        self, conn: AsyncConnection, history: list[_HistoryRow], stores_of: dict[str, str]
    ) -> tuple[int, int]:
        if not history:
            return 0, 0
        rows = [(row[0], stores_of[row[0]], *row[1:]) for row in history if row[0] in stores_of]
        if rows and self._copy:
            # COPY is the cheapest bulk insert PostgreSQL has; it runs in the flush's transaction.
            raw = await conn.get_raw_connection()
            await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
                health_history.name,
                records=_copy_records(rows),
                columns=HISTORY_COLUMNS,
            )
        elif rows:
            await conn.execute(
                health_history.insert(), [dict(zip(HISTORY_COLUMNS, row, strict=True)) for row in rows]
            )
        return len(rows), len(history) - len(rows)


def _copy_records(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    # asyncpg's COPY takes json as text: serialise the checks column here.
    return [(*row[:8], None if row[8] is None else json.dumps(row[8])) for row in rows]


def _update(**values: Any) -> sa.Update:
    # A revoked or decommissioned device that is still connected (Mosquitto keeps live sessions
    # until its restart) changes nothing.
    return (
        sa.update(devices)
        .where(devices.c.id == sa.bindparam("b_id"), devices.c.state == "active")
        .values(**values)
    )


def _received_at() -> sa.BindParameter[datetime]:
    return sa.bindparam("b_at", type_=UTCDateTime())


_FIRST_SEEN = sa.func.coalesce(devices.c.first_seen_at, _received_at())

_STATUS_UPDATE = _update(
    online=sa.bindparam("b_online"),
    last_seen_at=_received_at(),
    first_seen_at=_FIRST_SEEN,
)

_REPORTED_UPDATE = _update(
    applied_version=sa.bindparam("b_applied"),
    apply_status=sa.bindparam("b_status"),
    apply_reason=sa.bindparam("b_reason"),
    apply_detail=sa.bindparam("b_detail"),
    apply_reported_at=_received_at(),
    last_seen_at=_received_at(),
    online=sa.bindparam("b_online"),
    first_seen_at=_FIRST_SEEN,
)


def _health_update() -> sa.Update:
    """Liveness always; the latest-health columns only from a report newer than the stored one."""
    seq = sa.bindparam("b_seq", type_=sa.BigInteger())
    newer = sa.or_(devices.c.health_seq.is_(None), devices.c.health_seq < seq)

    def if_newer(value: sa.ColumnElement[Any], column: sa.Column[Any]) -> sa.ColumnElement[Any]:
        return sa.case((newer, value), else_=column)

    return _update(
        health=if_newer(sa.bindparam("b_health", type_=sa.JSON()), devices.c.health),
        health_status=if_newer(sa.bindparam("b_health_status", type_=sa.String(16)), devices.c.health_status),
        health_at=if_newer(_received_at(), devices.c.health_at),
        health_seq=if_newer(seq, devices.c.health_seq),
        health_dropped=devices.c.health_dropped + sa.bindparam("b_dropped", type_=sa.BigInteger()),
        last_seen_at=_received_at(),
        online=sa.bindparam("b_online"),
        first_seen_at=_FIRST_SEEN,
    )


_HEALTH_UPDATE = _health_update()


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


def _is_healthy(report: HealthReport) -> bool:
    # The agent already folds failing checks into `healthy`; an older or odd agent may not.
    return report.healthy and all(check.ok for check in report.checks)


def _check_json(check: Any) -> dict[str, Any]:
    return {"name": check.name, "ok": check.ok, "detail": check.detail, "at": check.at.isoformat()}


def _health_summary(report: HealthReport) -> dict[str, Any]:
    return {
        "seq": report.seq,
        "cpu_percent": report.cpu_percent,
        "memory_percent": report.memory_percent,
        "disk_percent": report.disk_percent,
        "uptime_s": report.uptime_s,
        "applied_version": report.applied_version,
        "healthy": _is_healthy(report),
        "checks": [_check_json(check) for check in report.checks],
    }
