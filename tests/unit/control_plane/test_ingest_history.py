"""Ingest batching: every health report becomes a history row, the device row keeps the newest."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from control_plane.audit import AuditLog
from control_plane.db.engine import create_engine, migrate
from control_plane.db.schema import devices, health_history, stores
from control_plane.ingest import Ingest
from protocol.messages import MAX_MESSAGE_BYTES
from tests.support.postgres import fresh_database

NOW = datetime.now(UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
        return
    async with fresh_database() as url:  # the COPY path of the history
        yield url


@pytest.fixture
async def ingest(database_url):
    engine = create_engine(database_url)
    await migrate(engine)
    async with engine.begin() as conn:
        await conn.execute(
            stores.insert().values(
                id="S1", name="s", timezone="UTC", config={}, created_at=NOW, updated_at=NOW
            )
        )
        await conn.execute(
            devices.insert(),
            [
                {"id": "dev-abc", "store_id": "S1", "enrolled_at": NOW, "state": "active"},
                {"id": "dev-def", "store_id": "S1", "enrolled_at": NOW, "state": "active"},
                {"id": "dev-gone", "store_id": "S1", "enrolled_at": NOW, "state": "revoked"},
            ],
        )
    yield Ingest(
        engine, AuditLog(engine), max_message_bytes=MAX_MESSAGE_BYTES, flush_interval_s=1, batch_size=100
    )
    await engine.dispose()


def _health(device_id: str, seq: int, **fields: Any) -> bytes:
    body = {
        "schema": 1,
        "device_id": device_id,
        "seq": seq,
        "cpu_percent": 1,
        "memory_percent": 2,
        "disk_percent": 3,
        "uptime_s": 4,
        **fields,
    }
    return json.dumps(body).encode()


async def _device(ingest: Ingest, device_id: str) -> Any:
    async with ingest._engine.connect() as conn:
        return (await conn.execute(sa.select(devices).where(devices.c.id == device_id))).one()


async def _history(ingest: Ingest) -> list[Any]:
    async with ingest._engine.connect() as conn:
        query = sa.select(health_history).order_by(health_history.c.device_id, health_history.c.seq)
        return list((await conn.execute(query)).all())


async def test_every_report_is_a_history_row_and_the_device_row_keeps_the_newest(ingest):
    for seq in (1, 3, 2):
        ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", seq, cpu_percent=seq * 10))
    ingest.handle("sf/v1/dev/dev-def/health", _health("dev-def", 1))
    assert ingest.coalesced == 2  # two device-row updates saved, no history lost
    await ingest.flush()

    rows = await _history(ingest)
    assert [(r.device_id, r.seq, r.cpu_percent) for r in rows] == [
        ("dev-abc", 1, 10),
        ("dev-abc", 2, 20),
        ("dev-abc", 3, 30),
        ("dev-def", 1, 1),
    ]
    assert {r.store_id for r in rows} == {"S1"}
    device = await _device(ingest, "dev-abc")
    assert device.health_seq == 3
    assert device.health["cpu_percent"] == 30
    assert device.health_status == "healthy"
    assert ingest.history_written == 4
    assert ingest.flushes == 1


async def test_a_late_report_goes_to_history_but_does_not_regress_the_device(ingest):
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 10, cpu_percent=50))
    await ingest.flush()
    first_seen = (await _device(ingest, "dev-abc")).first_seen_at
    assert first_seen is not None

    # An outbox backlog arrives in a later batch: older seq, sampled an hour ago, unhealthy.
    old_at = (NOW - timedelta(hours=1)).isoformat()
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 4, cpu_percent=99, healthy=False, at=old_at))
    await ingest.flush()

    device = await _device(ingest, "dev-abc")
    assert (device.health_seq, device.health["cpu_percent"], device.health_status) == (10, 50, "healthy")
    assert device.first_seen_at == first_seen
    assert abs((device.last_seen_at - datetime.now(UTC)).total_seconds()) < 5  # alive: it just sent
    rows = await _history(ingest)
    assert [(r.seq, r.healthy) for r in rows] == [(4, False), (10, True)]
    assert abs((rows[0].at - (NOW - timedelta(hours=1))).total_seconds()) < 1  # the sample's own time


async def test_failing_check_makes_the_device_unhealthy_and_is_kept_by_name(ingest):
    checks = [
        {"name": "pos-app", "ok": False, "detail": "connection refused", "at": NOW.isoformat()},
        {"name": "printer", "ok": True, "at": NOW.isoformat()},
    ]
    # healthy=true but a failing check: the control plane does not trust the summary alone.
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 1, checks=checks, dropped=3))
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 2, checks=checks, dropped=2))
    await ingest.flush()

    device = await _device(ingest, "dev-abc")
    assert device.health_status == "unhealthy"
    assert [(c["name"], c["ok"], c["detail"]) for c in device.health["checks"]] == [
        ("pos-app", False, "connection refused"),
        ("printer", True, ""),
    ]
    assert device.health_dropped == 5  # accumulated over both reports
    rows = await _history(ingest)
    assert [r.checks[0]["name"] for r in rows] == ["pos-app", "pos-app"]
    assert not any(r.healthy for r in rows)


async def test_a_report_delivered_twice_is_stored_and_its_drops_counted_once(ingest):
    # A QoS 1 backlog batch whose session dropped after the broker had the first two reports:
    # the agent sends the whole batch again after the reconnect; the first carries `dropped`.
    batch = [_health("dev-abc", 7, dropped=4), _health("dev-abc", 8), _health("dev-abc", 9)]
    for payload in batch[:2]:
        ingest.handle("sf/v1/dev/dev-abc/health", payload)
    await ingest.flush()
    seen_before = (await _device(ingest, "dev-abc")).last_seen_at
    for payload in batch:
        ingest.handle("sf/v1/dev/dev-abc/health", payload)
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 5))  # late, never seen: kept
    await ingest.flush()

    assert [r.seq for r in await _history(ingest)] == [5, 7, 8, 9]
    assert ingest.history_duplicates == 2
    assert ingest.history_written == 4
    device = await _device(ingest, "dev-abc")
    assert (device.health_seq, device.health_dropped) == (9, 4)
    assert device.last_seen_at > seen_before  # a duplicate still proves the device alive


async def test_a_reenrolled_device_starting_its_sequence_again_is_stored(ingest):
    for seq in (0, 1, 2):
        ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", seq))
    ingest.forget_sequence("dev-abc")  # what enrollment calls after a re-enrollment
    for seq in (0, 1):
        ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", seq, cpu_percent=50))
    await ingest.flush()
    assert [(r.seq, r.cpu_percent) for r in await _history(ingest)] == [
        (0, 1),
        (0, 50),
        (1, 1),
        (1, 50),
        (2, 1),
    ]
    assert ingest.history_duplicates == 0


async def test_future_device_clock_is_capped_at_receive_time(ingest):
    future = (NOW + timedelta(days=2)).isoformat()
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 1, at=future))
    await ingest.flush()
    (row,) = await _history(ingest)
    assert row.at <= datetime.now(UTC)


async def test_revoked_and_unknown_devices_write_nothing(ingest):
    ingest.handle("sf/v1/dev/dev-gone/health", _health("dev-gone", 1))
    ingest.handle("sf/v1/dev/dev-nobody/health", _health("dev-nobody", 1))
    await ingest.flush()
    assert await _history(ingest) == []
    assert ingest.history_ignored == 2
    assert (await _device(ingest, "dev-gone")).health_seq is None


async def test_a_failed_flush_keeps_the_history_for_the_next_one(ingest):
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 1))
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 2))
    async with ingest._engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE health_history RENAME TO hh_away"))
    with pytest.raises((sa.exc.DBAPIError, asyncpg.PostgresError)):  # COPY speaks asyncpg
        await ingest.flush()
    assert ingest.pending == 3  # one device row + two history rows
    async with ingest._engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE hh_away RENAME TO health_history"))
    await ingest.flush()
    assert [r.seq for r in await _history(ingest)] == [1, 2]
    assert (await _device(ingest, "dev-abc")).health_seq == 2


async def test_the_batch_size_wakes_the_writer_early(ingest):
    for seq in range(99):
        ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", seq))
    assert not ingest._wakeup.is_set()
    ingest.handle("sf/v1/dev/dev-abc/health", _health("dev-abc", 99))
    assert ingest._wakeup.is_set()  # 100 history rows: one device row, but a full batch


async def test_first_message_of_any_kind_sets_first_seen(ingest):
    status = {"schema": 1, "device_id": "dev-def", "state": "online"}
    ingest.handle("sf/v1/dev/dev-def/status", json.dumps(status).encode())
    await ingest.flush()
    device = await _device(ingest, "dev-def")
    assert device.online is True
    assert device.first_seen_at is not None
    assert device.health_status == "unknown"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (
            b'{"device_id": "dev-abc", "seq": 1, "cpu_percent": 1, "memory_percent": 2, '
            b'"disk_percent": 3, "uptime_s": 4}',
            "invalid_message",
        ),  # no schema
        (_health("dev-abc", 1).replace(b'"schema": 1', b'"schema": 9'), "unsupported_schema"),
        (_health("dev-abc", 1, cpu_percent=101), "invalid_message"),
        (b"not json", "invalid_message"),
    ],
)
async def test_fast_decoding_refuses_what_decode_refuses(ingest, payload, reason):
    ingest.handle("sf/v1/dev/dev-abc/health", payload)
    assert ingest.rejected[reason] == 1
    assert ingest.pending == 0
