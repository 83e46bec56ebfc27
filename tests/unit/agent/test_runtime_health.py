"""The agent's health path against a real Mosquitto: app checks in the reports, the post-apply
gate, and the outbox that keeps reports made while offline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import aiomqtt
import pytest

from agent.checks import SimulatedChecks
from agent.handlers import MemoryHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from agent.state import AgentState
from protocol.topics import TopicKind
from tests.unit.agent.broker_support import TIMEOUT_S, fast_settings
from tests.unit.agent.factories import signed_desired
from tests.unit.agent.test_runtime import closed_port

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

CHECKS = {
    "pos-app": {"kind": "tcp", "target": "127.0.0.1:9", "interval_s": 1},
    "pos-web": {"kind": "http", "target": "http://127.0.0.1:9/healthz", "interval_s": 1},
}


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[None]:
    task = asyncio.create_task(agent.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_health_reports_carry_check_results_and_turn_unhealthy_when_one_fails(
    tmp_path, broker, signing_key
):
    state = AgentState.in_memory()
    broker.enroll(state, "dev-0101", signing_key)
    checks = SimulatedChecks()
    agent = Agent(
        fast_settings(tmp_path, post_apply_grace_s=0),
        state,
        MemoryHandler(),
        SimulatedProbe(1),
        checks=checks,
    )

    async with broker.control_plane() as cp, running(agent):
        await cp.publish_desired(
            "dev-0101", signed_desired(1, signing_key, device_id="dev-0101", checks=CHECKS)
        )
        report = await cp.expect("dev-0101", TopicKind.REPORTED)
        assert report["status"] == "applied"
        health = await cp.expect("dev-0101", TopicKind.HEALTH, lambda h: len(h["checks"]) == 2)
        assert health["healthy"] is True
        assert [(c["name"], c["ok"]) for c in health["checks"]] == [("pos-app", True), ("pos-web", True)]

        checks.failing.add("pos-web")  # the app breaks; its next run (1 s) says so
        health = await cp.expect("dev-0101", TopicKind.HEALTH, lambda h: not h["healthy"])
        assert {c["name"]: c["ok"] for c in health["checks"]} == {"pos-app": True, "pos-web": False}
        assert health["checks"][1]["detail"] == "simulated http check failure"


async def test_a_version_whose_checks_fail_after_apply_is_reverted_and_reported(
    tmp_path, broker, signing_key
):
    state = AgentState.in_memory()
    broker.enroll(state, "dev-0102", signing_key)
    checks = SimulatedChecks(failing={"pos-app"})
    handler = MemoryHandler()
    settings = fast_settings(
        tmp_path, post_apply_grace_s=0.05, post_apply_attempts=2, post_apply_retry_s=0.05
    )
    agent = Agent(settings, state, handler, SimulatedProbe(1), checks=checks)

    async with broker.control_plane() as cp, running(agent):
        await cp.publish_desired("dev-0102", signed_desired(1, signing_key, device_id="dev-0102"))
        assert (await cp.expect("dev-0102", TopicKind.REPORTED))["status"] == "applied"
        await cp.publish_desired(
            "dev-0102", signed_desired(2, signing_key, device_id="dev-0102", checks=CHECKS)
        )
        report = await cp.expect("dev-0102", TopicKind.REPORTED)
        assert (report["status"], report["reason"], report["applied_version"]) == (
            "failed",
            "post_apply_unhealthy",
            1,
        )
        assert "pos-app" in report["detail"]
        assert handler.applied.version == 1
        # The checks of the reverted version are not the ones in force.
        assert agent.checks.checks == {}


async def test_reports_made_offline_arrive_after_reconnect_in_order_with_the_drop_count(
    tmp_path, broker, signing_key
):
    state = AgentState.open(tmp_path / "state")
    broker.enroll(state, "dev-0103", signing_key)
    interval, limit = 0.05, 8

    # Offline: the broker is unreachable; reports pile up in the bounded outbox.
    offline = Agent(
        fast_settings(
            tmp_path, broker_port=closed_port(), health_interval_s=interval, health_outbox_max=limit
        ),
        state,
        MemoryHandler(),
        SimulatedProbe(1),
    )
    async with running(offline):
        async with asyncio.timeout(TIMEOUT_S):
            while offline.stats.health_queued < limit + 5:
                await asyncio.sleep(interval)
    queued, dropped = state.queued_health(100)
    assert len(queued) == limit
    assert dropped >= 5
    first_seq = queued[0][0]

    online = Agent(
        fast_settings(tmp_path, health_interval_s=30, health_outbox_max=limit, health_backlog_batch=3),
        state,
        MemoryHandler(),
        SimulatedProbe(1),
    )
    async with broker.control_plane() as cp, running(online):
        received = [await cp.expect("dev-0103", TopicKind.HEALTH) for _ in range(limit)]
        async with asyncio.timeout(TIMEOUT_S):  # each report leaves the outbox once published
            while state.health_backlog():
                await asyncio.sleep(0.01)
        assert state.health_dropped() == 0
    # The first live report joined the full outbox, which dropped one more of the oldest.
    seqs = [report["seq"] for report in received]
    assert seqs == list(range(first_seq + 1, first_seq + 1 + limit))
    assert received[0]["dropped"] == dropped + 1
    assert all(report["dropped"] == 0 for report in received[1:])
    stamps = [datetime.fromisoformat(report["at"]) for report in received]
    assert stamps == sorted(stamps)
    assert (stamps[-1] - stamps[0]).total_seconds() > interval * (limit - 1)  # made over time, offline
    state.close()


async def test_desired_state_published_while_the_agent_is_down_is_applied_when_it_returns(
    tmp_path, broker, signing_key
):
    state = AgentState.open(tmp_path / "state")
    broker.enroll(state, "dev-0104", signing_key)
    settings = fast_settings(tmp_path)

    async with broker.control_plane() as cp:
        first = Agent(settings, state, MemoryHandler(), SimulatedProbe(1))
        async with running(first):
            await cp.publish_desired("dev-0104", signed_desired(1, signing_key, device_id="dev-0104"))
            assert (await cp.expect("dev-0104", TopicKind.REPORTED))["version"] == 1
        await cp.publish_desired(
            "dev-0104", signed_desired(2, signing_key, device_id="dev-0104")
        )  # agent down

        handler = MemoryHandler()
        again = Agent(settings, state, handler, SimulatedProbe(1))
        async with running(again):
            report = await cp.expect("dev-0104", TopicKind.REPORTED)
    assert (report["status"], report["version"], report["applied_version"]) == ("applied", 2, 2)
    assert handler.applied.version == 2
    assert state.applied().version == 2
    state.close()


class _SlowClient:
    """Stands in for the MQTT client: a publish completes (or fails) when the test says so."""

    def __init__(self) -> None:
        self.outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def publish(self, *_args: object, **_kwargs: object) -> None:
        await self.outcome


async def test_a_report_sent_while_the_sender_is_cancelled_is_counted_once_it_is_out(
    tmp_path, broker, signing_key
):
    # A shutdown cancels the health sender between handing a report to the client and hearing
    # that it went out; the simulator compares this count with what the control plane got.
    state = AgentState.in_memory()
    broker.enroll(state, "dev-0105", signing_key)
    agent = Agent(fast_settings(tmp_path), state, MemoryHandler(), SimulatedProbe(1))
    sent, failed = _SlowClient(), _SlowClient()

    for client in (sent, failed):
        sender = asyncio.create_task(agent._publish_health(client, b"{}", qos=0))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        sender.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sender
    assert agent.stats.health_published == 0
    sent.outcome.set_result(None)
    failed.outcome.set_exception(aiomqtt.MqttError("connection lost"))
    await asyncio.sleep(0.05)
    assert agent.stats.health_published == 1  # the one that went out; the failure is not counted
    state.close()
