"""Health probes: the numbers in a `HealthReport`.

`PsutilProbe` measures the real machine; `SimulatedProbe` makes cheap, deterministic numbers
for the simulator (a seeded random walk) and can be told to turn unhealthy.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from agent.errors import AgentError


@dataclass(frozen=True, slots=True)
class HealthSample:
    cpu_percent: float
    memory_percent: float
    disk_percent: float
    uptime_s: float
    healthy: bool = True


class HealthProbe(Protocol):
    async def sample(self) -> HealthSample:
        """Measure now. Raise `AgentError` (or time out) if the machine cannot be measured."""
        ...


def _clamp_percent(value: float) -> float:
    return min(100.0, max(0.0, float(value)))


class PsutilProbe:
    """CPU (since the previous sample, non-blocking), memory, disk of `disk_path`, uptime.

    `max_percent` marks the device unhealthy when memory or disk use goes above it.
    """

    def __init__(self, disk_path: Path, *, max_percent: float = 95.0) -> None:
        self.disk_path = disk_path
        self.max_percent = max_percent
        psutil.cpu_percent(interval=None)  # prime: the first non-blocking call returns 0.0

    async def sample(self) -> HealthSample:
        # Each call reads /proc or statvfs: microseconds, fine on the event loop.
        try:
            cpu = psutil.cpu_percent(interval=None)
            memory = psutil.virtual_memory().percent
            disk = psutil.disk_usage(str(self.disk_path)).percent
            uptime = max(0.0, time.time() - psutil.boot_time())
        except (OSError, psutil.Error) as exc:
            raise AgentError(f"health probe failed: {exc}") from exc
        return HealthSample(
            cpu_percent=_clamp_percent(cpu),
            memory_percent=_clamp_percent(memory),
            disk_percent=_clamp_percent(disk),
            uptime_s=uptime,
            healthy=memory <= self.max_percent and disk <= self.max_percent,
        )


class SimulatedProbe:
    """Deterministic per seed: a bounded random walk around a per-device baseline."""

    def __init__(
        self,
        seed: int,
        *,
        healthy: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Simulation, not security: a seeded PRNG makes runs reproducible.
        self._rng = random.Random(seed)  # noqa: S311
        self.healthy = healthy
        self._clock = clock
        self._started = clock()
        self._boot_offset = self._rng.uniform(60.0, 86_400.0)
        self._cpu = self._rng.uniform(2.0, 30.0)
        self._memory = self._rng.uniform(20.0, 60.0)
        self._disk = self._rng.uniform(10.0, 70.0)

    async def sample(self) -> HealthSample:
        rng = self._rng
        self._cpu = _clamp_percent(self._cpu + rng.uniform(-5.0, 5.0))
        self._memory = _clamp_percent(self._memory + rng.uniform(-1.0, 1.0))
        self._disk = _clamp_percent(self._disk + rng.uniform(-0.05, 0.1))
        return HealthSample(
            cpu_percent=round(self._cpu, 1),
            memory_percent=round(self._memory, 1),
            disk_percent=round(self._disk, 1),
            uptime_s=round(self._boot_offset + self._clock() - self._started, 1),
            healthy=self.healthy,
        )
