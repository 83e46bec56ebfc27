"""A real `storefleet-agent run` process that was offline: the desired state published meanwhile
is applied when it is back, and the health reports it made while offline reach the control
plane after the reconnect (the control plane keeps only the newest per device, so the proof is
its ingest count and the agent's emptied outbox)."""

from __future__ import annotations

import pytest

from tests.integration.test_agent_apply_crash import (
    AgentProcess,
    layer,
    marks,
    outbox_rows,
    set_store_layer,
    until,
    whole,
)
from tests.support.agents import enroll_agent
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


async def test_offline_agent_catches_up_and_delivers_its_buffered_health(embedded, tmp_path):
    cp = embedded
    ingest = cp.control_plane.services.ingest
    await cp.create_store("DE-OFF-1", **layer(1))
    enrolled = await enroll_agent(cp, "DE-OFF-1", tmp_path / "agent")
    enrolled.state.close()
    state_dir, config_dir, log = tmp_path / "agent", tmp_path / "agent" / "config", tmp_path / "agent.log"
    device = enrolled.device_id

    agent = AgentProcess(state_dir, log)
    try:
        view = await cp.wait_for_device(
            device, lambda view: view["applied_version"] == 1 and view["health"] is not None, timeout=30
        )
        await agent.stop()
    finally:
        agent.ensure_dead()
    seq_before = view["health"]["seq"]

    # While the device is away, the operator changes the store (retained on the broker)…
    await set_store_layer(cp, "DE-OFF-1", 2)
    await cp.wait_for_device(device, lambda view: view["desired_version"] == 2)

    # …and the agent runs without a broker for a while: its reports wait in the outbox.
    agent = AgentProcess(state_dir, log, broker_port=str(free_port()), health_interval_s="0.1")
    try:
        await until(lambda: outbox_rows(state_dir) >= 15)
        await agent.stop()
    finally:
        agent.ensure_dead()
    buffered = outbox_rows(state_dir)
    assert marks(config_dir) == whole(1)  # nothing applied while offline

    received_before = ingest.accepted["health"]
    agent = AgentProcess(state_dir, log, health_interval_s="5")
    try:
        view = await cp.wait_for_device(
            device, lambda view: view["applied_version"] == 2 and view["in_sync"], timeout=30
        )
        assert marks(config_dir) == whole(2)
        await until(lambda: outbox_rows(state_dir) == 0)
        await until(lambda: ingest.accepted["health"] - received_before >= buffered)
        view = await cp.wait_for_device(device, lambda view: view["health"]["seq"] >= seq_before + buffered)
        await agent.stop()
    finally:
        agent.ensure_dead()
