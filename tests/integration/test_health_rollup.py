"""Store status follows its devices' health, on both stacks, with real agents and real sessions.

The control plane runs with short health jobs: a device silent for 0.9 s (0.3 s x 3) is
stale, the sweeper and the roll-up run every 0.2 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import sqlalchemy as sa

from agent.handlers import FileConfigHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from agent.tls import broker_client_context
from control_plane.db.schema import health_history, store_events
from protocol.messages import CheckResult, ConnectionState, DeviceStatus, HealthReport
from protocol.topics import TopicKind, device_topic
from tests.conftest import start_stack
from tests.support.agents import EnrolledAgent, enroll_agent, running
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration

FAST_HEALTH_JOBS: dict[str, Any] = {
    "health_interval_s": 0.3,
    "offline_after_intervals": 3,
    "health_sweep_interval_s": 0.2,
    "store_rollup_interval_s": 0.2,
}


@pytest.fixture(
    params=[
        "embedded-sqlite",
        pytest.param("mosquitto-postgres", marks=[pytest.mark.mosquitto, pytest.mark.postgres]),
    ]
)
async def health_stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with start_stack(request.param, tmp_path, **FAST_HEALTH_JOBS) as cp:
        yield cp


async def wait_for(
    cp: RunningControlPlane, path: str, predicate: Any, timeout: float = 15.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await cp.api.get(path)
        assert response.status_code == 200, response.text
        body = response.json()
        if predicate(body):
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path} never reached the expected state: {body}")
        await asyncio.sleep(0.1)


def build_agent(enrolled: EnrolledAgent, probe: SimulatedProbe) -> Agent:
    return Agent(enrolled.settings, enrolled.state, FileConfigHandler(enrolled.settings.config_path), probe)


async def status_events(cp: RunningControlPlane, store_id: str) -> list[tuple[str, str]]:
    async with cp.control_plane.services.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(store_events.c.detail)
            .where(store_events.c.store_id == store_id, store_events.c.kind == "status_changed")
            .order_by(store_events.c.id)
        )
        return [(r.detail["from"], r.detail["to"]) for r in rows]


async def test_unhealthy_device_degrades_its_store_and_recovery_makes_it_ready(
    health_stack: RunningControlPlane, tmp_path
):
    cp = health_stack
    await cp.create_store("DE-BER-0100")
    first = await enroll_agent(cp, "DE-BER-0100", tmp_path / "a1")
    second = await enroll_agent(cp, "DE-BER-0100", tmp_path / "a2")
    sick = SimulatedProbe(2)
    async with running(build_agent(first, sick)) as a1, running(build_agent(second, SimulatedProbe(3))) as a2:
        await a1.wait_applied(1)
        await a2.wait_applied(1)
        await wait_for(cp, "/v1/stores/DE-BER-0100", lambda s: s["status"] == "ready")

        sick.healthy = False
        await wait_for(cp, "/v1/stores/DE-BER-0100", lambda s: s["status"] == "degraded")
        health = await wait_for(cp, "/v1/stores/DE-BER-0100/health", lambda h: h["unhealthy"] == 1)
        assert (health["devices"], health["online"], health["healthy"], health["in_sync"]) == (2, 2, 1, 2)
        device = await cp.device(first.device_id)
        assert device["health_status"] == "unhealthy"

        sick.healthy = True
        await wait_for(cp, "/v1/stores/DE-BER-0100", lambda s: s["status"] == "ready")
    assert ("ready", "degraded") in await status_events(cp, "DE-BER-0100")
    assert (await status_events(cp, "DE-BER-0100"))[-1] == ("degraded", "ready")


async def test_failing_app_check_degrades_the_store_and_history_shows_every_report(
    health_stack: RunningControlPlane, tmp_path
):
    cp = health_stack
    await cp.create_store("FR-LYO-0007")
    enrolled = await enroll_agent(cp, "FR-LYO-0007", tmp_path / "agent")
    host, port = cp.settings.broker_endpoint

    def report(seq: int, *, app_ok: bool) -> bytes:
        checks = [
            CheckResult(name="pos-app", ok=app_ok, detail="" if app_ok else "HTTP 503"),
            CheckResult(name="printer", ok=True),
        ]
        return HealthReport(
            device_id=enrolled.device_id,
            seq=seq,
            cpu_percent=5,
            memory_percent=30,
            disk_percent=40,
            uptime_s=100 + seq,
            healthy=app_ok,
            checks=checks,
        ).to_json()

    # The device's own mTLS session (what its agent's app checks will publish).
    topic = device_topic(enrolled.device_id, TopicKind.HEALTH)
    async with aiomqtt.Client(
        host, port, identifier=enrolled.device_id, tls_context=broker_client_context(enrolled.state)
    ) as device:
        online = DeviceStatus(device_id=enrolled.device_id, state=ConnectionState.ONLINE)
        await device.publish(device_topic(enrolled.device_id, TopicKind.STATUS), online.to_json(), qos=1)
        for seq in (1, 2, 3):
            await device.publish(topic, report(seq, app_ok=False), qos=1)
        await wait_for(cp, "/v1/stores/FR-LYO-0007", lambda s: s["status"] == "degraded")
        health = await wait_for(cp, "/v1/stores/FR-LYO-0007/health", lambda h: h["failing_checks"])
        assert health["failing_checks"] == {"pos-app": 1}
        view = await cp.device(enrolled.device_id)
        assert [(c["name"], c["ok"], c["detail"]) for c in view["checks"]] == [
            ("pos-app", False, "HTTP 503"),
            ("printer", True, ""),
        ]

        for seq in (4, 5):
            await device.publish(topic, report(seq, app_ok=True), qos=1)
            await asyncio.sleep(0.15)  # keep the device fresh while the roll-up catches up
        await wait_for(cp, "/v1/stores/FR-LYO-0007", lambda s: s["status"] == "ready")

    history = await cp.api.get(f"/v1/devices/{enrolled.device_id}/health-history")
    assert history.status_code == 200, history.text
    samples = history.json()
    assert [s["seq"] for s in samples] == [5, 4, 3, 2, 1]  # every report, newest first
    assert [s["healthy"] for s in samples] == [True, True, False, False, False]
    assert samples[-1]["checks"][0]["name"] == "pos-app"
    limited = await cp.api.get(f"/v1/devices/{enrolled.device_id}/health-history", params={"limit": 2})
    assert [s["seq"] for s in limited.json()] == [5, 4]
    assert (await cp.api.get("/v1/devices/dev-nobody0/health-history")).status_code == 404
    naive = await cp.api.get(
        f"/v1/devices/{enrolled.device_id}/health-history", params={"since": "2026-01-01T00:00:00"}
    )
    assert naive.status_code == 422
    assert (await cp.api.get("/v1/stores/NOPE/health")).status_code == 404


async def test_device_that_vanishes_without_goodbye_goes_offline_and_so_does_its_store(
    health_stack: RunningControlPlane, tmp_path
):
    cp = health_stack
    await cp.create_store("NL-AMS-0003")
    enrolled = await enroll_agent(cp, "NL-AMS-0003", tmp_path / "agent")
    host, port = cp.settings.broker_endpoint
    # Online, one report, then a clean DISCONNECT with no offline status: no will is published,
    # exactly what a broker restart or a frozen agent looks like to the control plane.
    async with aiomqtt.Client(
        host, port, identifier=enrolled.device_id, tls_context=broker_client_context(enrolled.state)
    ) as device:
        status = DeviceStatus(device_id=enrolled.device_id, state=ConnectionState.ONLINE)
        await device.publish(device_topic(enrolled.device_id, TopicKind.STATUS), status.to_json(), qos=1)
        report = HealthReport(
            device_id=enrolled.device_id, seq=1, cpu_percent=1, memory_percent=1, disk_percent=1, uptime_s=1
        )
        await device.publish(device_topic(enrolled.device_id, TopicKind.HEALTH), report.to_json(), qos=1)
        await cp.wait_for_device(
            enrolled.device_id, lambda d: d["online"] and d["health_status"] == "healthy"
        )
        await wait_for(cp, "/v1/stores/NL-AMS-0003", lambda s: s["status"] == "ready")

    await wait_for(cp, "/v1/stores/NL-AMS-0003", lambda s: s["status"] == "offline")
    health = (await cp.api.get("/v1/stores/NL-AMS-0003/health")).json()
    assert (health["devices"], health["online"]) == (1, 0)
    # The sweeper wrote it down too (not only the read-time staleness of the views).
    assert cp.control_plane.services.health.sweeper.marked_offline >= 1
    assert (await status_events(cp, "NL-AMS-0003"))[-1] == ("ready", "offline")
    metrics = (await cp.api.get("/metrics")).text
    assert 'storefleet_store_status_changes_total{to="offline"}' in metrics
    assert 'storefleet_stores{status="offline"} 1.0' in metrics
    assert "storefleet_devices_marked_offline_total" in metrics


async def test_retention_removes_old_history(tmp_path):
    async with start_stack(
        "embedded-sqlite", tmp_path, health_retention_hours=1, health_retention_interval_s=0.2
    ) as cp:
        await cp.create_store("IT-ROM-0001")
        enrolled = await enroll_agent(cp, "IT-ROM-0001", tmp_path / "agent")
        now = datetime.now(UTC)
        rows = [
            {
                "device_id": enrolled.device_id,
                "store_id": "IT-ROM-0001",
                "at": now - timedelta(minutes=minutes),
                "seq": seq,
                "healthy": True,
                "cpu_percent": 1.0,
                "memory_percent": 1.0,
                "disk_percent": 1.0,
                "checks": None,
            }
            for seq, minutes in enumerate([200, 120, 61, 30, 1])
        ]
        async with cp.control_plane.services.engine.begin() as conn:
            await conn.execute(health_history.insert(), rows)
        path = f"/v1/devices/{enrolled.device_id}/health-history"
        samples = await wait_for(cp, path, lambda body: len(body) == 2)
        assert [s["seq"] for s in samples] == [4, 3]
        assert cp.control_plane.services.health.history.deleted == 3
