"""Devices that stopped talking without a goodbye go offline.

The MQTT will covers a connection the broker sees die. It does not cover a broker restart, a
network path that silently drops packets until keep-alive gives up on a *later* broker, or an
agent frozen while its TCP connection stays up. A device not heard from for
`offline_after` (health interval x `offline_after_intervals`) is marked offline, in one
UPDATE, by server receive time.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import devices


class StalenessSweeper:
    def __init__(self, *, engine: AsyncEngine, offline_after: timedelta, clock: Clock = utc_now) -> None:
        self._engine = engine
        self._offline_after = offline_after
        self._clock = clock
        self.marked_offline = 0

    async def sweep(self) -> int:
        """Mark stale devices offline; return how many."""
        cutoff = self._clock() - self._offline_after
        stale = sa.or_(devices.c.last_seen_at.is_(None), devices.c.last_seen_at < cutoff)
        async with self._engine.begin() as conn:
            result = await conn.execute(
                sa.update(devices).where(devices.c.online, stale).values(online=False)
            )
        count = max(result.rowcount, 0)
        self.marked_offline += count
        return count
