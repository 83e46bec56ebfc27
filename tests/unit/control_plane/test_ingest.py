"""Ingest validates and coalesces device messages; a hostile payload is counted, never raised."""

from __future__ import annotations

import json

import pytest

from control_plane.audit import AuditLog
from control_plane.db.engine import create_engine, migrate
from control_plane.ingest import Ingest
from protocol.messages import MAX_MESSAGE_BYTES


@pytest.fixture
async def ingest(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await migrate(engine)
    yield Ingest(
        engine, AuditLog(engine), max_message_bytes=MAX_MESSAGE_BYTES, flush_interval_s=1, batch_size=100
    )
    await engine.dispose()


def _health(device_id: str, seq: int) -> bytes:
    return json.dumps(
        {
            "schema": 1,
            "device_id": device_id,
            "seq": seq,
            "cpu_percent": 1,
            "memory_percent": 2,
            "disk_percent": 3,
            "uptime_s": 4,
        }
    ).encode()


async def test_deeply_nested_payload_is_rejected_and_counted(ingest):
    raw = _health("dev-abc", 1).replace(b'"seq": 1', b'"seq": 1, "x": ' + b"[" * 50_000 + b"]" * 50_000)
    assert len(raw) < MAX_MESSAGE_BYTES
    ingest.handle("sf/v1/dev/dev-abc/health", raw)  # must not raise
    assert ingest.rejected["invalid_message"] == 1
    assert ingest.pending == 0


async def test_liveness_uses_receive_time_not_the_device_clock(ingest, tmp_path):
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from control_plane.db.schema import devices, stores

    now = datetime.now(UTC)
    async with ingest._engine.begin() as conn:
        await conn.execute(
            stores.insert().values(
                id="S1", name="s", timezone="UTC", config={}, created_at=now, updated_at=now
            )
        )
        await conn.execute(devices.insert().values(id="dev-abc", store_id="S1", enrolled_at=now))
    skewed = json.loads(_health("dev-abc", 7))
    skewed["at"] = (now - timedelta(hours=3)).isoformat()  # a store device whose clock is 3 h behind
    ingest.handle("sf/v1/dev/dev-abc/health", json.dumps(skewed).encode())
    await ingest.flush()
    async with ingest._engine.connect() as conn:
        row = (await conn.execute(sa.select(devices).where(devices.c.id == "dev-abc"))).one()
    assert row.online is True
    assert abs((row.last_seen_at - datetime.now(UTC)).total_seconds()) < 5
    assert row.health_seq == 7


def _result(device_id: str, command_id: str = "cmd-00000001") -> bytes:
    return json.dumps(
        {"schema": 1, "device_id": device_id, "command_id": command_id, "status": "succeeded"}
    ).encode()


def _status(device_id: str, state: str) -> bytes:
    return json.dumps({"schema": 1, "device_id": device_id, "state": state}).encode()


async def test_command_results_and_online_devices_are_routed_to_the_command_worker(ingest):
    results, online = [], []
    ingest.route_commands(results.append, on_online=online.append)

    ingest.handle("sf/v1/dev/dev-abc/cmd/result", _result("dev-abc"))
    ingest.handle("sf/v1/dev/dev-abc/cmd/result", b'{"schema": 1, "device_id": "dev-abc"}')
    ingest.handle("sf/v1/dev/dev-abc/status", _status("dev-abc", "online"))
    ingest.handle("sf/v1/dev/dev-def/status", _status("dev-def", "offline"))

    assert [(r.device_id, r.command_id) for r in results] == [("dev-abc", "cmd-00000001")]
    assert ingest.rejected["invalid_message"] == 1
    assert online == ["dev-abc"]


async def test_a_command_result_for_another_device_is_refused_and_audited(ingest):
    results: list[object] = []
    ingest.route_commands(results.append)

    ingest.handle("sf/v1/dev/dev-abc/cmd/result", _result("dev-victim"))
    await ingest._audit.flush()

    assert results == []
    assert ingest.rejected["device_id_mismatch"] == 1
    [record] = await ingest._audit.records(action="mqtt.identity_mismatch")
    assert record["actor"] == "dev-abc"
    assert record["detail"]["payload_device_id"] == "dev-victim"
