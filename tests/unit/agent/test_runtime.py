"""`Agent` against a real Mosquitto with the product's mTLS + ACL configuration and real
certificates from the built-in CA. The control plane's side is a plain aiomqtt client with
the control plane's service certificate."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from agent.errors import AgentError, NotEnrolled
from agent.handlers import MemoryHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from agent.settings import AgentSettings
from agent.state import AgentState
from agent.tls import broker_client_context
from protocol.messages import HealthReport
from protocol.topics import TopicKind
from tests.unit.agent.broker_support import TIMEOUT_S, fast_settings
from tests.unit.agent.factories import signed_desired


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def online(body: dict[str, Any]) -> bool:
    return body["state"] == "online"


def offline(body: dict[str, Any]) -> bool:
    return body["state"] == "offline"


@pytest.mark.integration
@pytest.mark.mosquitto
async def test_agent_goes_online_applies_reports_health_and_says_goodbye(tmp_path, broker, signing_key):
    state = AgentState.open(tmp_path / "state")
    broker.enroll(state, "dev-0001", signing_key)
    handler = MemoryHandler()
    applied: list[int] = []
    agent = Agent(fast_settings(tmp_path), state, handler, SimulatedProbe(1), on_applied=applied.append)

    async with broker.control_plane() as cp:
        task = asyncio.create_task(agent.run())
        status = await cp.expect("dev-0001", TopicKind.STATUS, online)
        assert status["device_id"] == "dev-0001"
        assert agent.connected

        first = await cp.expect("dev-0001", TopicKind.HEALTH)
        second = await cp.expect("dev-0001", TopicKind.HEALTH)
        assert second["seq"] > first["seq"]
        assert 0 <= first["cpu_percent"] <= 100

        await cp.publish_desired("dev-0001", signed_desired(1, signing_key, device_id="dev-0001"))
        report = await cp.expect("dev-0001", TopicKind.REPORTED)
        assert (report["status"], report["version"], report["applied_version"]) == ("applied", 1, 1)
        async with asyncio.timeout(TIMEOUT_S):
            await agent.wait_applied(1)
        assert applied == [1]
        assert handler.applied.version == 1
        health = await cp.expect("dev-0001", TopicKind.HEALTH)
        assert health["applied_version"] == 1

        tampered = signed_desired(2, signing_key, device_id="dev-0001")
        tampered["config"] = {"evil": True}
        await cp.publish_desired("dev-0001", tampered)
        report = await cp.expect("dev-0001", TopicKind.REPORTED)
        assert (report["status"], report["reason"], report["applied_version"]) == (
            "rejected",
            "bad_signature",
            1,
        )

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await cp.expect("dev-0001", TopicKind.STATUS, offline)
        assert not agent.connected
    assert state.applied().version == 1
    state.close()


@pytest.mark.integration
@pytest.mark.mosquitto
async def test_retained_state_is_applied_on_connect_and_acknowledged_after_restart(
    tmp_path, broker, signing_key
):
    state = AgentState.in_memory()
    broker.enroll(state, "dev-0002", signing_key)
    settings = fast_settings(tmp_path)

    async with broker.control_plane() as cp:
        await cp.publish_desired("dev-0002", signed_desired(3, signing_key, device_id="dev-0002"))
        first_handler = MemoryHandler()
        agent = Agent(settings, state, first_handler, SimulatedProbe(2))
        async with running(agent):
            report = await cp.expect("dev-0002", TopicKind.REPORTED)
            assert (report["status"], report["version"]) == ("applied", 3)
        assert first_handler.attempts == 1

        # A restarted agent gets the retained document again: acknowledged, not re-applied.
        second_handler = MemoryHandler()
        restarted = Agent(settings, state, second_handler, SimulatedProbe(2))
        assert restarted.applied_version == 3
        async with running(restarted):
            report = await cp.expect("dev-0002", TopicKind.REPORTED)
            assert (report["status"], report["version"], report["applied_version"]) == ("applied", 3, 3)
        assert second_handler.attempts == 0
    state.close()


@pytest.mark.integration
@pytest.mark.mosquitto
async def test_agent_reconnects_after_losing_its_session(tmp_path, broker, signing_key):
    state = AgentState.in_memory()
    broker.enroll(state, "dev-0003", signing_key)
    agent = Agent(fast_settings(tmp_path), state, MemoryHandler(), SimulatedProbe(3))

    async with broker.control_plane() as cp, running(agent):
        await cp.expect("dev-0003", TopicKind.STATUS, online)
        before = await cp.expect("dev-0003", TopicKind.HEALTH)

        # Someone with the device's identity takes the session over: the broker drops the agent.
        intruder = aiomqtt.Client(
            broker.host,
            broker.port,
            identifier="dev-0003",
            tls_context=broker_client_context(state),
            timeout=TIMEOUT_S,
        )
        with contextlib.suppress(aiomqtt.MqttError):
            async with intruder:
                async with asyncio.timeout(TIMEOUT_S):
                    while agent.connected:
                        await asyncio.sleep(0.01)

        async with asyncio.timeout(TIMEOUT_S):
            while not (agent.connected and agent.reconnects >= 1):
                await asyncio.sleep(0.01)
        assert agent.stats.connection_losses >= 1
        assert agent.stats.last_error is not None

        await cp.publish_desired("dev-0003", signed_desired(1, signing_key, device_id="dev-0003"))
        report = await cp.expect("dev-0003", TopicKind.REPORTED)
        assert report["status"] == "applied"
        after = await cp.expect("dev-0003", TopicKind.HEALTH)
        assert after["seq"] > before["seq"]
    state.close()


@pytest.mark.integration
@pytest.mark.mosquitto
async def test_many_agents_share_one_event_loop(tmp_path, broker, signing_key):
    count = 40
    states = [AgentState.in_memory() for _ in range(count)]
    ids = [f"dev-{i:04d}" for i in range(100, 100 + count)]
    for state, device_id in zip(states, ids, strict=True):
        broker.enroll(state, device_id, signing_key)
    settings = fast_settings(tmp_path, health_interval_s=5.0)
    agents = [Agent(settings, state, MemoryHandler(), SimulatedProbe(i)) for i, state in enumerate(states)]

    async with broker.control_plane() as cp, contextlib.AsyncExitStack() as stack:
        for agent in agents:
            await stack.enter_async_context(running(agent))
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.gather(*(agent.wait_connected() for agent in agents))
        for device_id in ids:
            await cp.publish_desired(device_id, signed_desired(1, signing_key, device_id=device_id))
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.gather(*(agent.wait_applied(1) for agent in agents))
    assert all(agent.applied_version == 1 for agent in agents)
    for state in states:
        state.close()


@pytest.mark.integration
@pytest.mark.mosquitto
async def test_a_quiet_session_is_kept_alive_at_a_slower_housekeeping_interval(tmp_path, broker, signing_key):
    """Mosquitto drops a client silent for 1.5 keep-alives (7.5 s here, noticed within ~10 s);
    housekeeping every 2 s (simulated fleets run it less often than aiomqtt's 1 s) still sends
    the pings (at 20 s this test fails: the session is dropped and made again)."""
    state = AgentState.in_memory()
    broker.enroll(state, "dev-0200", signing_key)
    settings = fast_settings(tmp_path, keepalive_s=5, mqtt_housekeeping_s=2.0, health_interval_s=3600.0)
    agent = Agent(settings, state, MemoryHandler(), SimulatedProbe(0))
    async with broker.control_plane(), running(agent):
        async with asyncio.timeout(TIMEOUT_S):
            await agent.wait_connected()
        await asyncio.sleep(11)  # nothing but keep-alive traffic for longer than the broker allows
        assert agent.connected
        assert agent.stats.connects == 1, agent.stats.last_error
    state.close()


# --- without a broker ----------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_unreachable_broker_is_retried_with_backoff_until_cancelled(tmp_path, memory_state):
    settings = fast_settings(tmp_path, broker_host="127.0.0.1", broker_port=closed_port())
    agent = Agent(settings, memory_state, MemoryHandler(), SimulatedProbe(0))
    task = asyncio.create_task(agent.run())
    async with asyncio.timeout(TIMEOUT_S):
        while agent.stats.connect_attempts < 4:
            await asyncio.sleep(0.01)
    assert not task.done()
    assert not agent.connected
    assert agent.stats.connects == 0
    assert agent.stats.last_error is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_an_agent_needs_an_enrolled_state(tmp_path):
    with pytest.raises(NotEnrolled):
        Agent(fast_settings(tmp_path), AgentState.in_memory(), MemoryHandler(), SimulatedProbe(0))


def test_settings_override_the_enrolled_broker_and_interval(tmp_path, memory_state):
    agent = Agent(
        fast_settings(tmp_path, broker_host="10.0.0.5", broker_port=18883, health_interval_s=7.0),
        memory_state,
        MemoryHandler(),
        SimulatedProbe(0),
    )
    assert (agent.broker_host, agent.broker_port, agent.health_interval_s) == ("10.0.0.5", 18883, 7.0)
    enrolled = Agent(AgentSettings(state_dir=tmp_path), memory_state, MemoryHandler(), SimulatedProbe(0))
    assert (enrolled.broker_host, enrolled.broker_port, enrolled.health_interval_s) == (
        "127.0.0.1",
        8883,
        30.0,
    )


class BrokenProbe:
    async def sample(self):
        raise AgentError("no /proc")


class HangingProbe:
    async def sample(self):
        await asyncio.sleep(3600)


@pytest.mark.parametrize("probe", [BrokenProbe(), HangingProbe()])
async def test_a_failing_probe_reports_unhealthy_instead_of_stopping(tmp_path, memory_state, probe):
    agent = Agent(fast_settings(tmp_path, probe_timeout_s=0.05), memory_state, MemoryHandler(), probe)
    seq = await agent._queue_health_report()
    [(queued_seq, payload)], _ = memory_state.queued_health(10)
    report = HealthReport.model_validate_json(payload)
    assert report.healthy is False
    assert report.seq == seq == queued_seq == 0
