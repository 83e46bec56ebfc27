"""The audit log: who did what to which target, and what came of it.

Security refusals (bad tokens, refused broker connections, forged topics) are written here
and logged at WARNING, so they are loud. Callers on hot or synchronous paths (the broker's
callbacks) use `record_nowait`; a single writer task drains the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import audit_log

logger = logging.getLogger("storefleet.audit")


class Outcome(StrEnum):
    SUCCESS = "success"
    DENIED = "denied"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    action: str
    outcome: Outcome
    actor: str
    target: str | None = None
    source: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    def __init__(self, engine: AsyncEngine, *, clock: Clock = utc_now, queue_size: int = 10_000) -> None:
        self._engine = engine
        self._clock = clock
        self._queue: asyncio.Queue[tuple[datetime, AuditEvent]] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0

    def _row(self, at: datetime, event: AuditEvent) -> dict[str, Any]:
        if event.outcome is not Outcome.SUCCESS:
            logger.warning(
                "audit %s %s actor=%s target=%s source=%s detail=%s",
                event.action,
                event.outcome,
                event.actor,
                event.target,
                event.source,
                event.detail,
            )
        return {
            "at": at,
            "actor": event.actor,
            "action": event.action,
            "target": event.target,
            "outcome": event.outcome.value,
            "source": event.source,
            "detail": event.detail,
        }

    async def record(self, event: AuditEvent, *, connection: AsyncConnection | None = None) -> None:
        """Write one record now, inside `connection`'s transaction when given."""
        row = self._row(self._clock(), event)
        if connection is not None:
            await connection.execute(audit_log.insert(), [row])
            return
        async with self._engine.begin() as conn:
            await conn.execute(audit_log.insert(), [row])

    def record_nowait(self, event: AuditEvent) -> None:
        """Queue a record from synchronous code; `run` writes it."""
        try:
            self._queue.put_nowait((self._clock(), event))
        except asyncio.QueueFull:
            self.dropped += 1
            logger.error("audit queue full, dropped %s %s", event.action, event.outcome)  # noqa: TRY400

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(audit_log.insert(), [self._row(at, ev) for at, ev in batch])
            except Exception:
                logger.exception("could not write %d audit records", len(batch))

    async def flush(self) -> None:
        """Write what is queued (used at shutdown, after `run` is cancelled)."""
        batch = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if batch:
            with contextlib.suppress(Exception):
                async with self._engine.begin() as conn:
                    await conn.execute(audit_log.insert(), [self._row(at, ev) for at, ev in batch])

    async def records(self, *, action: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if action is not None:
            query = query.where(audit_log.c.action == action)
        async with self._engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]
