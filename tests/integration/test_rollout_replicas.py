"""Two control-plane replicas' rollout drivers on one PostgreSQL database: exactly one drives;
when it stops or crashes (lease not released: taken over after its time to live), the other
takes over and finishes the rollout without repeating a step.

The drivers run without a broker (leadership is a database matter; full replicas on one
broker are in test_replicas.py). The devices are offline, so the rollout progresses by
skipping them on its clock; with every canary skipped it pauses for lack of evidence once,
and the test resumes it (as an operator would) to let it finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from control_plane.audit import AuditLog
from control_plane.db.engine import create_engine, migrate
from control_plane.db.schema import devices, leases, releases, rollout_events, stores
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.pki.signing_keys import SigningKeyring
from control_plane.rollouts.driver import RolloutDriver
from control_plane.rollouts.models import Plan, RolloutCreate, RolloutView, Selector, Wave
from control_plane.rollouts.service import RolloutService
from tests.support.postgres import fresh_database

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


class _NoBroker:
    """These replicas have no broker session (nothing is sent: every device is offline)."""

    is_connected = False

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        raise AssertionError("nothing should be published")


async def _seed(engine) -> None:
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            stores.insert().values(
                id="S1", name="S1", timezone="UTC", config={}, created_at=now, updated_at=now
            )
        )
        await conn.execute(
            devices.insert(),
            [
                {"id": f"dev-{i}", "store_id": "S1", "role": "pos", "enrolled_at": now, "online": False}
                for i in range(3)
            ],
        )
        await conn.execute(
            releases.insert().values(
                id="r1", name="r1", layer={"config": {"a": 1}}, created_by="test", created_at=now
            )
        )


async def _wait_state(service: RolloutService, state: str) -> RolloutView:
    for _ in range(100):
        view = await service.get("ro-ha")
        if view.state == state:
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"rollout never reached {state}: {view}")


async def _lease_kept() -> None:
    """A crashed replica never gets to release its lease."""


@pytest.mark.parametrize("how", ["stops", "crashes"])
async def test_one_driver_at_a_time_and_failover(tmp_path, how):
    async with fresh_database() as url:
        engines = [create_engine(url), create_engine(url)]
        try:
            await migrate(engines[0])
            await _seed(engines[0])
            drivers = [
                RolloutDriver(
                    engine=engine,
                    publisher=DesiredStatePublisher(
                        engine, SigningKeyring.load_or_create(tmp_path / f"keys-{i}"), _NoBroker()
                    ),
                    tick_s=0.1,
                    lease_ttl_s=1.0,
                    holder=f"replica-{i}",
                )
                for i, engine in enumerate(engines)
            ]
            service = RolloutService(engine=engines[0], audit=AuditLog(engines[0]))
            await service.create(
                RolloutCreate(
                    id="ro-ha",
                    release_id="r1",
                    selector=Selector(stores=["S1"]),
                    plan=Plan(
                        waves=[Wave(count=1), Wave(percent=100)], window="now", offline_skip_after_s=1.5
                    ),
                ),
                actor="test",
            )
            tasks = [asyncio.create_task(d.run()) for d in drivers]
            try:
                for _ in range(50):
                    if any(d.is_leader for d in drivers):
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                assert sum(d.is_leader for d in drivers) == 1
                leader = next(i for i, d in enumerate(drivers) if d.is_leader)
                follower = 1 - leader
                assert (await service.get("ro-ha")).state == "running"

                # The leader stops (its lease is released on the way out) or crashes (the lease
                # stays until its time to live runs out); either way the other takes over.
                if how == "crashes":
                    drivers[leader].lease.release = _lease_kept  # type: ignore[method-assign]
                tasks[leader].cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tasks[leader]
                paused = await _wait_state(service, "paused")
                assert (paused.reason or "").startswith("no evidence: every device of wave 0 was skipped")
                await service.resume("ro-ha", actor="test")
                view = await _wait_state(service, "completed")
                assert view.states == {"skipped": 3}
                assert drivers[follower].is_leader
                async with engines[0].connect() as conn:
                    holder = await conn.scalar(sa.select(leases.c.holder))
                    kinds = list(
                        await conn.scalars(
                            sa.select(rollout_events.c.kind)
                            .where(rollout_events.c.rollout_id == "ro-ha")
                            .order_by(rollout_events.c.id)
                        )
                    )
                assert holder == f"replica-{follower}"
                # Each step happened once, whichever replica made it.
                assert kinds.count("started") == 1
                assert kinds.count("paused") == 1
                assert kinds.count("wave_started") == 1
                assert kinds.count("completed") == 1
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            for engine in engines:
                await engine.dispose()
