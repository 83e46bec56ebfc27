"""A control-plane restart keeps identity and state, and devices carry on without re-applying."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import start_stack
from tests.support.agents import enroll_agent, running

pytestmark = pytest.mark.integration


async def test_restart_keeps_ca_devices_and_delivers_new_config(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path) as cp:
        ca_before = (await cp.anonymous.get("/v1/pki/ca")).text
        await cp.create_store("DE-BER-0001", config={"v": 1})
        enrolled = await enroll_agent(cp, "DE-BER-0001", tmp_path / "agent")
        async with running(enrolled.build()) as agent:
            await agent.wait_applied(1)
        data_dir, ports = cp.settings.data_dir, {"port": cp.settings.port, "mqtt_port": cp.settings.mqtt_port}

    async with start_stack("embedded-sqlite", tmp_path, **ports) as cp:
        assert cp.settings.data_dir == data_dir
        assert (await cp.anonymous.get("/v1/pki/ca")).text == ca_before
        view = await cp.device(enrolled.device_id)
        assert (view["applied_version"], view["desired_version"]) == (1, 1)
        agent = enrolled.build()
        async with running(agent):
            # The broker was empty after the restart: the retained desired state was refilled.
            await cp.wait_for_device(enrolled.device_id, lambda d: d["online"])
            # "online" is published before the subscription delivers the retained state: wait.
            for _ in range(100):
                if agent.stats.desired_received >= 1:
                    break
                await asyncio.sleep(0.05)
            assert agent.stats.desired_received >= 1
            assert agent.applied_version == 1
            await cp.api.put("/v1/stores/DE-BER-0001/config", json={"config": {"v": 2}})
            await agent.wait_applied(2)
