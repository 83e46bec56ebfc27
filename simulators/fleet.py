"""Many real agents in one process: the same enrollment, mTLS session and reconciler a
device runs, with in-memory state, an in-memory apply handler and simulated probes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.checks import SimulatedChecks
from agent.enrollment import enroll
from agent.handlers import MemoryHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from agent.settings import AgentSettings
from agent.state import AgentState
from protocol.messages import DeviceInfo

logger = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0-sim"
# MQTT housekeeping of simulated agents (keep-alive pings; the keep-alive is 30 s): a task per
# client waking every second would be most of an idle fleet's cost to its event loop.
SIMULATED_HOUSEKEEPING_S = 5.0


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One simulated device: which token it enrolls with and what it says about itself."""

    token: str
    role: str
    model: str = "simulated"
    serial: str = ""
    apply_failure_rate: float = 0.0


@dataclass
class SimulatedDevice:
    spec: DeviceSpec
    agent: Agent
    handler: MemoryHandler
    enroll_seconds: float


@dataclass
class Fleet:
    devices: list[SimulatedDevice] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def connected(self) -> int:
        return sum(1 for device in self.devices if device.agent.connected)

    def start(self) -> None:
        for device in self.devices:
            self._tasks.append(
                asyncio.create_task(device.agent.run(), name=f"agent-{device.agent.device_id}")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for device in self.devices:
            device.agent.state.close()


async def enroll_fleet(
    specs: Sequence[DeviceSpec],
    *,
    server_url: str,
    ca_fingerprint: str,
    settings: AgentSettings,
    seed: int = 0,
    concurrency: int = 50,
    on_applied: Callable[[str, int], None] | None = None,
) -> Fleet:
    """Enroll every spec (own key, CSR, token over HTTPS) and build its agent; do not run yet."""
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()

    async def one(index: int, spec: DeviceSpec) -> SimulatedDevice:
        async with gate:
            state = AgentState.in_memory()
            started = loop.time()
            await enroll(
                server_url=server_url,
                token=spec.token,
                state=state,
                ca_fingerprint=ca_fingerprint,
                device=DeviceInfo(
                    hostname=f"sim-{index:05d}",
                    model=spec.model,
                    serial=spec.serial or f"SIM{seed:03d}{index:06d}",
                    os="simulated",
                    agent_version=AGENT_VERSION,
                    role=spec.role,
                ),
                timeout_s=settings.http_timeout_s,
            )
            elapsed = loop.time() - started
        handler = MemoryHandler(failure_rate=spec.apply_failure_rate, seed=seed * 1_000_003 + index)
        device_id = state.require_enrollment().device_id
        agent = Agent(
            settings,
            state,
            handler,
            SimulatedProbe(seed * 1_000_003 + index),
            on_applied=(lambda version: on_applied(device_id, version)) if on_applied else None,
            # App checks declared in the desired state pass unless told otherwise (no real apps here).
            checks=SimulatedChecks(),
        )
        return SimulatedDevice(spec=spec, agent=agent, handler=handler, enroll_seconds=elapsed)

    devices = await asyncio.gather(*(one(i, spec) for i, spec in enumerate(specs)))
    return Fleet(devices=list(devices))


@contextlib.contextmanager
def simulator_settings(**overrides: Any) -> Iterator[AgentSettings]:
    """Agent settings for in-process agents (state stays in memory; the dir is a formality)."""
    overrides.setdefault("mqtt_housekeeping_s", SIMULATED_HOUSEKEEPING_S)
    with tempfile.TemporaryDirectory(prefix="storefleet-sim-") as tmp:
        yield AgentSettings(state_dir=Path(tmp), **overrides)
