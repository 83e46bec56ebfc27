"""Real agents for integration tests: enroll over HTTPS, run against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from agent.enrollment import enroll
from agent.handlers import FileConfigHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from agent.settings import AgentSettings
from agent.state import AgentState
from protocol.messages import DeviceInfo
from tests.support.control_plane import RunningControlPlane


@dataclass
class EnrolledAgent:
    settings: AgentSettings
    state: AgentState
    device_id: str

    @property
    def config_file(self) -> Path:
        return self.settings.config_path / "config.json"

    def build(self) -> Agent:
        return Agent(
            self.settings, self.state, FileConfigHandler(self.settings.config_path), SimulatedProbe(1)
        )


async def enroll_agent(
    cp: RunningControlPlane, store_id: str, state_dir: Path, *, role: str = "pos"
) -> EnrolledAgent:
    token = await cp.create_token(store_id)
    settings = AgentSettings(
        state_dir=state_dir,
        health_interval_s=0.3,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )
    state = AgentState.open(state_dir)
    response = await enroll(
        server_url=cp.base_url,
        token=token["token"],
        state=state,
        ca_fingerprint=token["ca_fingerprint"],
        device=DeviceInfo(hostname="test-host", model="POS-T1", serial="SN-1", os="Debian 12", role=role),
        timeout_s=10,
    )
    return EnrolledAgent(settings=settings, state=state, device_id=response.device_id)


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.wait_connected(), 15)
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
