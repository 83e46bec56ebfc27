"""A leader lease with a fencing token, in the database (PostgreSQL and SQLite alike).

One row per lease name. A replica takes the lease when it is free or expired, which bumps
the token; it keeps it by renewing before `ttl` runs out. Every write the leader makes as
leader runs `fence(conn)` in the same transaction: the update only matches while the row
still names this holder with this token, so a replica that lost the lease (paused, cut off,
its renewal late) cannot write after a successor took over — its transaction is refused.

Time is each replica's clock (NTP-synchronised hosts assumed); the TTL (seconds) dwarfs the
skew of such hosts.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import leases

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """This replica no longer holds the lease: whatever it was writing is rolled back."""


class Lease:
    def __init__(
        self, engine: AsyncEngine, *, name: str, holder: str, ttl_s: float, clock: Clock = utc_now
    ) -> None:
        self._engine = engine
        self.name = name
        self.holder = holder
        self._ttl = timedelta(seconds=ttl_s)
        self._clock = clock
        self.token: int | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    async def acquire_or_renew(self) -> bool:
        """Take the lease if free/expired, or renew ours. True while we hold it."""
        now = self._clock()
        async with self._engine.begin() as conn:
            if self.token is not None:
                renewed = await conn.execute(
                    sa.update(leases)
                    .where(
                        leases.c.name == self.name,
                        leases.c.holder == self.holder,
                        leases.c.token == self.token,
                    )
                    .values(expires_at=now + self._ttl)
                )
                if renewed.rowcount == 1:
                    return True
                logger.warning("lease %s lost (token %s)", self.name, self.token)
                self.token = None
            taken = await conn.execute(
                sa.update(leases)
                .where(leases.c.name == self.name, leases.c.expires_at < now)
                .values(holder=self.holder, token=leases.c.token + 1, expires_at=now + self._ttl)
                .returning(leases.c.token)
            )
            row = taken.first()
            if row is not None:
                self.token = int(row.token)
                logger.info("lease %s taken by %s (token %d)", self.name, self.holder, self.token)
                return True
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    leases.insert().values(
                        name=self.name, holder=self.holder, token=1, expires_at=now + self._ttl
                    )
                )
        except IntegrityError:
            return False  # somebody holds it
        self.token = 1
        logger.info("lease %s created by %s", self.name, self.holder)
        return True

    async def fence(self, conn: AsyncConnection) -> None:
        """In the caller's transaction: refuse unless we still hold the lease."""
        if self.token is None:
            raise LeaseLost(self.name)
        result = await conn.execute(
            sa.update(leases)
            .where(
                leases.c.name == self.name,
                leases.c.holder == self.holder,
                leases.c.token == self.token,
                leases.c.expires_at > self._clock(),
            )
            .values(expires_at=self._clock() + self._ttl)
        )
        if result.rowcount != 1:
            self.token = None
            raise LeaseLost(self.name)

    async def release(self) -> None:
        """On a clean shutdown: let a successor take over at once instead of after the TTL."""
        if self.token is None:
            return
        async with self._engine.begin() as conn:
            await conn.execute(
                sa.update(leases)
                .where(
                    leases.c.name == self.name, leases.c.holder == self.holder, leases.c.token == self.token
                )
                .values(expires_at=self._clock() - timedelta(seconds=1))
            )
        self.token = None
