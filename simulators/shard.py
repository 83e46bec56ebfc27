"""A shard of the simulated fleet: some real agents in one event loop, and what they did.

The scenario driver (`simulators.scenarios`) never touches an agent directly: it talks to
shards, which enroll their devices, run them, inject the faults of the seeded plan and emit
*events* (plain tuples, so they cross a process boundary unchanged):

    ("enrolled", device_id, store_id, index, enroll_seconds, t)
    ("apply", device_id, version, ok, t)          an apply finished (ok or failed)
    ("conn", device_id, connected, t)             a connection came up or went down
    ("fault", device_id, kind, t)                 an injected fault started
    ("final", shard, {figures})                   after stop: per-shard counters
    ("error", shard, text)

Times are `time.monotonic()`, which on Linux is one clock for every process on the machine,
so events from worker processes (`--procs`) line up with the driver's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from agent.checks import SimulatedChecks
from agent.enrollment import enroll
from agent.errors import ApplyError
from agent.handlers import MemoryHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from agent.settings import AgentSettings
from agent.state import AgentState
from protocol.messages import DesiredState, DeviceInfo
from simulators.faults import Fault, FaultKind
from simulators.fleet import SIMULATED_HOUSEKEEPING_S

logger = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0-sim"
Event = tuple[Any, ...]
Emit = Callable[[Event], None]
# Connection state is sampled this often (cheaper than hooking every agent's session).
CONNECTION_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One simulated device: its place in the fleet, the token it enrolls with, its behaviour."""

    index: int  # position in the whole fleet (seeds and fault plan are keyed on it)
    token: str
    role: str
    apply_failure_rate: float = 0.0
    apply_delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Everything a shard needs; picklable, so a worker process gets the same as the driver."""

    shard: int
    server_url: str
    ca_fingerprint: str
    specs: tuple[DeviceSpec, ...]
    seed: int
    agent_settings: dict[str, Any]
    enroll_concurrency: int = 50
    faults: tuple[Fault, ...] = ()


class ReportingHandler(MemoryHandler):
    """`MemoryHandler` (with its seeded failures and delays) that says how each apply ended."""

    def __init__(self, emit: Emit, device_id: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._emit = emit
        self._device_id = device_id

    async def apply(self, desired: DesiredState) -> None:
        try:
            await super().apply(desired)
        except ApplyError:
            self._emit(("apply", self._device_id(), desired.version, False, time.monotonic()))
            raise
        self._emit(("apply", self._device_id(), desired.version, True, time.monotonic()))


@dataclass
class _Device:
    spec: DeviceSpec
    agent: Agent
    handler: ReportingHandler
    task: asyncio.Task[None] | None = None
    seen_connects: int = 0
    seen_connected: bool = False


@dataclass
class Shard:
    config: ShardConfig
    emit: Emit
    devices: list[_Device] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _process: psutil.Process = field(default_factory=psutil.Process)
    _rss_baseline: int = 0
    _cpu_marks: dict[str, float] = field(default_factory=dict)

    async def enroll(self) -> None:
        """Enroll every device (own key, CSR, token over HTTPS) and build its agent."""
        self._rss_baseline = self._process.memory_info().rss
        settings = AgentSettings(
            **{"mqtt_housekeeping_s": SIMULATED_HOUSEKEEPING_S, **self.config.agent_settings}
        )
        gate = asyncio.Semaphore(self.config.enroll_concurrency)
        seed = self.config.seed

        async def one(spec: DeviceSpec) -> _Device:
            async with gate:
                state = AgentState.in_memory()
                started = time.monotonic()
                await enroll(
                    server_url=self.config.server_url,
                    token=spec.token,
                    state=state,
                    ca_fingerprint=self.config.ca_fingerprint,
                    device=DeviceInfo(
                        hostname=f"sim-{spec.index:05d}",
                        model="simulated",
                        serial=f"SIM{seed:03d}{spec.index:06d}",
                        os="simulated",
                        agent_version=AGENT_VERSION,
                        role=spec.role,
                    ),
                    timeout_s=settings.http_timeout_s,
                )
                finished = time.monotonic()
            enrollment = state.require_enrollment()
            device_seed = seed * 1_000_003 + spec.index
            # Faulty behaviour starts with the fault plan (`start_faults`), after provisioning.
            handler = ReportingHandler(self.emit, lambda: enrollment.device_id, seed=device_seed)
            agent = Agent(settings, state, handler, SimulatedProbe(device_seed), checks=SimulatedChecks())
            self.emit(("enrolled", agent.device_id, agent.store_id, spec.index, finished - started, finished))
            return _Device(spec=spec, agent=agent, handler=handler)

        self.devices = list(await asyncio.gather(*(one(spec) for spec in self.config.specs)))

    def start(self) -> None:
        for device in self.devices:
            self._start_agent(device)
        self._tasks.append(asyncio.create_task(self._watch_connections(), name="watch-connections"))

    def start_faults(self, started: float) -> None:
        """Turn on the devices' faulty behaviour and run this shard's part of the fault plan,
        `Fault.at_s` counted from `started` (monotonic)."""
        for device in self.devices:
            device.handler.failure_rate = device.spec.apply_failure_rate
            device.handler.delay_s = device.spec.apply_delay_s
        by_index = {device.spec.index: device for device in self.devices}
        for fault in self.config.faults:
            target = by_index.get(fault.device_index)
            if target is not None:
                self._tasks.append(asyncio.create_task(self._inject(target, fault, started)))

    def mark_cpu(self, name: str) -> None:
        times = self._process.cpu_times()
        self._cpu_marks[name] = times.user + times.system
        self._cpu_marks[name + "@"] = time.monotonic()
        self._cpu_marks[name + ":health"] = sum(d.agent.stats.health_published for d in self.devices)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        rss = self._process.memory_info().rss
        running = [device.task for device in self.devices if device.task is not None]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self._poll_connections()
        figures = {
            "devices": len(self.devices),
            "pid": os.getpid(),
            "rss_mb": round(rss / 2**20, 1),
            "rss_added_mb": round((rss - self._rss_baseline) / 2**20, 1),
            "cpu_marks": dict(self._cpu_marks),
            "per_device": {
                device.agent.device_id: {
                    "health_published": device.agent.stats.health_published,
                    "reports_published": device.agent.stats.reports_published,
                    "connects": device.agent.stats.connects,
                    "connection_losses": device.agent.stats.connection_losses,
                    "apply_attempts": device.handler.attempts,
                    "applied_version": device.agent.applied_version,
                }
                for device in self.devices
            },
        }
        for device in self.devices:
            device.agent.state.close()
        self.emit(("final", self.config.shard, figures))

    # --- internals ---------------------------------------------------------------------

    def _start_agent(self, device: _Device) -> None:
        device.task = asyncio.create_task(device.agent.run(), name=f"agent-{device.agent.device_id}")

    async def _stop_agent(self, device: _Device) -> None:
        task, device.task = device.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _inject(self, device: _Device, fault: Fault, started: float) -> None:
        await asyncio.sleep(max(0.0, started + fault.at_s - time.monotonic()))
        self.emit(("fault", device.agent.device_id, fault.kind.value, time.monotonic()))
        # A disconnect is a clean session end and an immediate reconnect; offline keeps the
        # device away for `duration_s` (power cut, closed store, network down).
        await self._stop_agent(device)
        if fault.kind is FaultKind.OFFLINE:
            await asyncio.sleep(fault.duration_s)
        self._start_agent(device)

    async def _watch_connections(self) -> None:
        while True:
            self._poll_connections()
            await asyncio.sleep(CONNECTION_POLL_S)

    def _poll_connections(self) -> None:
        now = time.monotonic()
        for device in self.devices:
            connected, connects = device.agent.connected, device.agent.stats.connects
            device_id = device.agent.device_id
            if connects != device.seen_connects:
                # New connections since the last poll (possibly up and down in between).
                if device.seen_connected:
                    self.emit(("conn", device_id, False, now))
                self.emit(("conn", device_id, True, now))
                if not connected:
                    self.emit(("conn", device_id, False, now))
            elif connected != device.seen_connected:
                self.emit(("conn", device_id, connected, now))
            device.seen_connected, device.seen_connects = connected, connects


async def run_worker_loop(config: ShardConfig, emit: Emit, commands: Callable[[], Any]) -> None:
    """A worker process's life: obey the driver's commands in order, emitting events."""
    shard = Shard(config, emit)
    while True:
        command, *arguments = await asyncio.to_thread(commands)
        try:
            if command == "enroll":
                await shard.enroll()
                emit(("ack", config.shard, "enroll"))
            elif command == "start":
                shard.start()
                emit(("ack", config.shard, "start"))
            elif command == "faults":
                shard.start_faults(arguments[0])
                emit(("ack", config.shard, "faults"))
            elif command == "mark_cpu":
                shard.mark_cpu(arguments[0])
                emit(("ack", config.shard, "mark_cpu"))
            elif command == "stop":
                await shard.stop()
                emit(("ack", config.shard, "stop"))
                return
        except Exception as exc:
            logger.exception("shard %d: %s failed", config.shard, command)
            emit(("error", config.shard, f"{command}: {type(exc).__name__}: {exc}"))
            return
