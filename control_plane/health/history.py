"""The health history: reads for the API, and retention in bounded batches.

Ingest appends one row per report (`control_plane.ingest`) and does not store a report an
agent re-sent (a lost acknowledgement) again when it recognises it (`health.replay`). One can
still be stored twice when the copies reach different replicas or straddle the ingest's
periodic reset, so reads collapse rows with the same seq: a device's history shows each
report once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import devices, health_history
from control_plane.errors import InvalidInput, NotFound
from control_plane.health.models import HealthSample

logger = logging.getLogger(__name__)

MAX_LIMIT = 1000


class HealthHistory:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        retention: timedelta,
        delete_batch: int,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._retention = retention
        self._delete_batch = delete_batch
        self._clock = clock
        self.deleted = 0

    async def samples(self, device_id: str, *, since: datetime | None, limit: int) -> list[HealthSample]:
        """The device's reports, newest first, at or after `since`."""
        if since is not None and since.tzinfo is None:
            raise InvalidInput("field 'since': give a time zone, e.g. 2026-01-31T08:00:00Z")
        limit = max(1, min(limit, MAX_LIMIT))
        h = health_history.c
        newest_per_seq = sa.select(sa.func.max(h.id)).where(h.device_id == device_id).group_by(h.seq)
        if since is not None:
            newest_per_seq = newest_per_seq.where(h.at >= since)
        query = (
            sa.select(health_history)
            .where(h.id.in_(newest_per_seq))
            .order_by(h.at.desc(), h.seq.desc())
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            exists = (await conn.execute(sa.select(devices.c.id).where(devices.c.id == device_id))).first()
            if exists is None:
                raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
            rows = (await conn.execute(query)).all()
        return [
            HealthSample(
                seq=r.seq,
                at=r.at,
                healthy=r.healthy,
                cpu_percent=r.cpu_percent,
                memory_percent=r.memory_percent,
                disk_percent=r.disk_percent,
                checks=r.checks or [],
            )
            for r in rows
        ]

    async def enforce_retention(self) -> int:
        """Delete rows older than the retention, `delete_batch` rows per transaction.

        Small transactions keep locks short and let ingest's writes interleave; the loop
        yields between batches.
        """
        cutoff = self._clock() - self._retention
        h = health_history.c
        total = 0
        while True:
            oldest = sa.select(h.id).where(h.at < cutoff).limit(self._delete_batch)
            async with self._engine.begin() as conn:
                result = await conn.execute(sa.delete(health_history).where(h.id.in_(oldest)))
            deleted = max(result.rowcount, 0)
            total += deleted
            if deleted < self._delete_batch:
                break
            await asyncio.sleep(0)
        self.deleted += total
        if total:
            logger.info("health retention deleted %d reports older than %s", total, cutoff.isoformat())
        return total
