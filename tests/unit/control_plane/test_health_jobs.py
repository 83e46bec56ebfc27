"""Staleness sweep, store status roll-up and history retention on a real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from control_plane.db.engine import create_engine, migrate
from control_plane.db.schema import (
    desired_states,
    devices,
    health_history,
    store_events,
    store_provisioning,
    stores,
)
from control_plane.health.history import HealthHistory
from control_plane.health.models import StoreStatus
from control_plane.health.rollup import DeviceCounts, StoreRollup, derive_status
from control_plane.health.staleness import StalenessSweeper
from tests.support.postgres import fresh_database

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
OFFLINE_AFTER = timedelta(seconds=90)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
        await migrate(engine)
        yield engine
        await engine.dispose()
        return
    async with fresh_database() as url:
        engine = create_engine(url)
        await migrate(engine)
        yield engine
        await engine.dispose()


async def _store(engine, store_id: str, status: str = "ready") -> None:
    async with engine.begin() as conn:
        await conn.execute(
            stores.insert().values(
                id=store_id,
                name=store_id,
                timezone="UTC",
                config={},
                created_at=T0,
                updated_at=T0,
                status=status,
            )
        )


async def _device(engine, device_id: str, store_id: str, **fields: Any) -> None:
    values: dict[str, Any] = {
        "id": device_id,
        "store_id": store_id,
        "enrolled_at": T0,
        "state": "active",
        "online": True,
        "last_seen_at": T0,
        "desired_version": 1,
        "applied_version": 1,
        "health_status": "healthy",
        **fields,
    }
    async with engine.begin() as conn:
        await conn.execute(devices.insert().values(**values))
        await conn.execute(
            desired_states.insert().values(
                device_id=device_id, version=values["desired_version"], document={}, created_at=T0
            )
        )


async def _set(engine, device_id: str, **values: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.update(devices).where(devices.c.id == device_id).values(**values))


async def _status(engine, store_id: str) -> str:
    async with engine.connect() as conn:
        return str(
            (await conn.execute(sa.select(stores.c.status).where(stores.c.id == store_id))).scalar_one()
        )


@pytest.mark.parametrize(
    ("counts", "status"),
    [
        (DeviceCounts(devices=0, online=0, unhealthy=0, out_of_sync=0), StoreStatus.READY),
        (DeviceCounts(devices=3, online=0, unhealthy=3, out_of_sync=3), StoreStatus.OFFLINE),
        (DeviceCounts(devices=3, online=2, unhealthy=0, out_of_sync=0), StoreStatus.DEGRADED),
        (DeviceCounts(devices=3, online=3, unhealthy=1, out_of_sync=0), StoreStatus.DEGRADED),
        (DeviceCounts(devices=3, online=3, unhealthy=0, out_of_sync=1), StoreStatus.DEGRADED),
        (DeviceCounts(devices=3, online=3, unhealthy=0, out_of_sync=0), StoreStatus.READY),
    ],
)
def test_status_rule(counts, status):
    assert derive_status(counts) is status


async def test_sweeper_marks_only_stale_devices_offline_in_one_pass(engine):
    clock = FakeClock()
    await _store(engine, "S1")
    await _device(engine, "dev-fresh", "S1", last_seen_at=T0 + timedelta(seconds=60))
    await _device(engine, "dev-stale", "S1", last_seen_at=T0 - timedelta(seconds=1))
    await _device(engine, "dev-quiet", "S1", online=False, last_seen_at=T0 - timedelta(days=1))
    clock.now = T0 + OFFLINE_AFTER
    sweeper = StalenessSweeper(engine=engine, offline_after=OFFLINE_AFTER, clock=clock)
    assert await sweeper.sweep() == 1
    async with engine.connect() as conn:
        online = dict((await conn.execute(sa.select(devices.c.id, devices.c.online))).all())
    assert online == {"dev-fresh": True, "dev-stale": False, "dev-quiet": False}
    assert await sweeper.sweep() == 0
    assert sweeper.marked_offline == 1


async def test_rollup_follows_devices_and_records_each_change(engine):
    clock = FakeClock()
    rollup = StoreRollup(
        engine=engine, offline_after=OFFLINE_AFTER, sync_grace=timedelta(minutes=5), clock=clock
    )
    await _store(engine, "S1")
    await _device(engine, "dev-a", "S1")
    await _device(engine, "dev-b", "S1")
    assert await rollup.run_once() == {}

    await _set(engine, "dev-a", health_status="unhealthy")
    assert await rollup.run_once() == {"S1": ("ready", "degraded")}
    assert await rollup.run_once() == {}  # no change, no event

    await _set(engine, "dev-a", health_status="healthy")
    assert await rollup.run_once() == {"S1": ("degraded", "ready")}

    # Everything silent for longer than offline_after: offline, even before any sweep.
    clock.now = T0 + OFFLINE_AFTER + timedelta(seconds=1)
    assert await rollup.run_once() == {"S1": ("ready", "offline")}

    await _set(engine, "dev-b", last_seen_at=clock.now)
    assert await rollup.run_once() == {"S1": ("offline", "degraded")}  # one of two online

    async with engine.connect() as conn:
        events = (
            await conn.execute(
                sa.select(store_events.c.kind, store_events.c.detail, store_events.c.at).order_by(
                    store_events.c.id
                )
            )
        ).all()
        changed_at = (await conn.execute(sa.select(stores.c.status_changed_at))).scalar_one()
    assert [(e.kind, e.detail["from"], e.detail["to"]) for e in events] == [
        ("status_changed", "ready", "degraded"),
        ("status_changed", "degraded", "ready"),
        ("status_changed", "ready", "offline"),
        ("status_changed", "offline", "degraded"),
    ]
    assert changed_at == clock.now
    assert rollup.changes == {"degraded": 2, "ready": 1, "offline": 1}


async def test_rollup_sync_grace_and_failed_apply(engine):
    clock = FakeClock()
    rollup = StoreRollup(
        engine=engine, offline_after=OFFLINE_AFTER, sync_grace=timedelta(minutes=5), clock=clock
    )
    await _store(engine, "S1")
    await _device(engine, "dev-a", "S1", desired_version=2, applied_version=1)  # version 2 made at T0
    assert await rollup.run_once() == {}  # still within the grace
    await _set(engine, "dev-a", apply_status="failed")
    assert await rollup.run_once() == {"S1": ("ready", "degraded")}  # a failure needs no grace
    await _set(engine, "dev-a", apply_status=None)
    assert await rollup.run_once() == {"S1": ("degraded", "ready")}
    clock.now = T0 + timedelta(minutes=1)
    await _set(engine, "dev-a", last_seen_at=T0 + timedelta(minutes=6))
    clock.now = T0 + timedelta(minutes=6)
    assert await rollup.run_once() == {"S1": ("ready", "degraded")}  # grace over, still not applied


async def test_rollup_leaves_provisioning_and_decommissioned_stores_alone(engine):
    clock = FakeClock()
    rollup = StoreRollup(
        engine=engine, offline_after=OFFLINE_AFTER, sync_grace=timedelta(minutes=5), clock=clock
    )
    await _store(engine, "S-PROV", status="provisioning")
    await _store(engine, "S-GONE", status="decommissioned")
    await _store(engine, "S-SAGA")  # status says ready but its saga is still running
    for store_id in ("S-PROV", "S-GONE", "S-SAGA"):
        await _device(engine, f"dev-{store_id.lower()}", store_id, online=False)
    async with engine.begin() as conn:
        await conn.execute(
            store_provisioning.insert().values(
                store_id="S-SAGA",
                state="waiting_for_devices",
                expected={},
                token_ids=[],
                started_at=T0,
                updated_at=T0,
            )
        )
    assert await rollup.run_once() == {}
    assert [await _status(engine, s) for s in ("S-PROV", "S-GONE", "S-SAGA")] == [
        "provisioning",
        "decommissioned",
        "ready",
    ]
    async with engine.begin() as conn:
        await conn.execute(sa.update(store_provisioning).values(state="ready"))
    assert await rollup.run_once() == {"S-SAGA": ("ready", "offline")}


async def test_store_health_counts(engine):
    clock = FakeClock()
    rollup = StoreRollup(
        engine=engine, offline_after=OFFLINE_AFTER, sync_grace=timedelta(minutes=5), clock=clock
    )
    await _store(engine, "S1")
    failing = {"checks": [{"name": "pos-app", "ok": False}, {"name": "printer", "ok": True}]}
    await _device(engine, "dev-a", "S1", health_status="unhealthy", health=failing, health_at=T0)
    await _device(engine, "dev-b", "S1", health_status="unhealthy", health=failing, online=False)
    await _device(engine, "dev-c", "S1", health_status="unknown", desired_version=2)
    await _device(engine, "dev-d", "S1", state="revoked")
    health = await rollup.store_health("S1")
    assert (
        health.devices,
        health.online,
        health.healthy,
        health.unhealthy,
        health.unknown,
        health.in_sync,
    ) == (
        3,
        2,
        0,
        2,
        1,
        2,
    )
    assert health.failing_checks == {"pos-app": 2}
    assert health.last_report_at == T0


async def test_retention_deletes_old_rows_in_batches(engine):
    clock = FakeClock()
    await _store(engine, "S1")
    await _device(engine, "dev-a", "S1")
    rows = [
        {
            "device_id": "dev-a",
            "store_id": "S1",
            "at": T0 - timedelta(hours=hours),
            "seq": 100 - hours,
            "healthy": True,
            "cpu_percent": 1.0,
            "memory_percent": 1.0,
            "disk_percent": 1.0,
            "checks": None,
        }
        for hours in range(30)
    ]
    async with engine.begin() as conn:
        await conn.execute(health_history.insert(), rows)
    history = HealthHistory(engine=engine, retention=timedelta(hours=24), delete_batch=2, clock=clock)
    assert await history.enforce_retention() == 5  # 25..29 h old, in batches of 2
    samples = await history.samples("dev-a", since=None, limit=1000)
    assert len(samples) == 25
    assert [s.seq for s in samples[:3]] == [100, 99, 98]  # newest first
    assert len(await history.samples("dev-a", since=T0 - timedelta(hours=2), limit=1000)) == 3
    assert history.deleted == 5
