"""The rollout leader lease on SQLite and PostgreSQL: one holder, takeover after expiry, and
a stale leader's writes refused by the fencing token."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.db.engine import create_engine, migrate
from control_plane.rollouts.lease import Lease, LeaseLost
from tests.support.postgres import fresh_database

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@contextlib.asynccontextmanager
async def _database(kind: str, tmp_path) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'lease.db'}"
    else:
        async with fresh_database() as url:
            yield url


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_one_holder_takeover_after_expiry_and_fencing(kind, tmp_path):
    async with _database(kind, tmp_path) as url:
        engine = create_engine(url)
        try:
            await migrate(engine)
            clock = Clock()
            first = Lease(engine, name="driver", holder="replica-a", ttl_s=5, clock=clock)
            second = Lease(engine, name="driver", holder="replica-b", ttl_s=5, clock=clock)
            assert await first.acquire_or_renew()
            assert not await second.acquire_or_renew()
            clock.now += timedelta(seconds=3)
            assert await first.acquire_or_renew()  # renewed: good for 5 s from here
            clock.now += timedelta(seconds=3)
            assert not await second.acquire_or_renew()

            # replica-a stops renewing (dead or paused); after the TTL replica-b takes over.
            clock.now += timedelta(seconds=6)
            assert await second.acquire_or_renew()
            assert second.token == (first.token or 0) + 1
            # replica-a wakes up and tries to write as leader: refused, and it knows it.
            with pytest.raises(LeaseLost):
                async with engine.begin() as conn:
                    await first.fence(conn)
            assert not first.held
            assert not await first.acquire_or_renew()
            async with engine.begin() as conn:
                await second.fence(conn)

            # A clean shutdown hands over at once.
            await second.release()
            assert await first.acquire_or_renew()
        finally:
            await engine.dispose()
