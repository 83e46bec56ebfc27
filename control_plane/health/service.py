"""The periodic health jobs of the control plane: staleness sweep, store roll-up, retention.

Plain asyncio loops rather than APScheduler: each job is one short statement batch on a
fixed interval, and a loop inside the process's task group is cancelled and awaited with
everything else (APScheduler would add its own executor, job store and shutdown path for
no gain). A job that fails is logged and tried again at its next interval. Several
control-plane replicas may run them at once: the sweep and retention are idempotent and
the roll-up writes with compare-and-set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from control_plane.health.history import HealthHistory
from control_plane.health.rollup import StoreRollup
from control_plane.health.staleness import StalenessSweeper

logger = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self,
        *,
        sweeper: StalenessSweeper,
        rollup: StoreRollup,
        history: HealthHistory,
        sweep_interval_s: float,
        rollup_interval_s: float,
        retention_interval_s: float,
    ) -> None:
        self.sweeper = sweeper
        self.rollup = rollup
        self.history = history
        self._intervals = (sweep_interval_s, rollup_interval_s, retention_interval_s)

    async def run(self) -> None:
        sweep_s, rollup_s, retention_s = self._intervals
        async with asyncio.TaskGroup() as group:
            group.create_task(_every(sweep_s, "staleness sweep", self.sweeper.sweep))
            group.create_task(_every(rollup_s, "store roll-up", self.rollup.run_once))
            group.create_task(_every(retention_s, "health retention", self.history.enforce_retention))


async def _every(interval_s: float, name: str, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        try:
            await job()
        except Exception:
            logger.exception("%s failed; next try in %.1fs", name, interval_s)
        await asyncio.sleep(interval_s)
