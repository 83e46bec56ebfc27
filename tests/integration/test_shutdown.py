"""Worker loops end when cancelled, even when they were just woken.

On Python 3.11 `asyncio.wait_for` drops a cancellation that arrives just after the awaited
event was set: a worker loop waiting that way for its wake-up never ends, and the control
plane's shutdown waits for it forever (seen once in CI as a 180 s timeout in a fixture's
teardown). Each worker is started, woken while it waits, given a few loop turns (the window
moves with them), then cancelled: it must end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from control_plane.runtime import ControlPlane, Services
from control_plane.settings import ControlPlaneSettings
from tests.support.control_plane import ADMIN_KEY
from tests.support.ports import free_port
from tests.support.waiting import finish_within, wait_until

pytestmark = pytest.mark.integration

Worker = Callable[[Services], tuple[Callable[[], Coroutine[Any, Any, None]], Callable[[], None]]]

WORKERS: dict[str, Worker] = {
    "ingest": lambda s: (s.ingest.run, s.ingest._wakeup.set),
    "provisioning": lambda s: (s.provisioning_worker.run, s.provisioning_worker.wake),
    "rollout-driver": lambda s: (s.rollout_driver.run, s.rollout_driver.wake),
    "desired-publisher": lambda s: (s.publisher.run, lambda: s.publisher.request_refresh(everyone=True)),
}


@pytest.fixture
async def services(tmp_path) -> AsyncIterator[Services]:
    settings = ControlPlaneSettings(
        data_dir=tmp_path / "cp",
        host="127.0.0.1",
        port=free_port(),
        mqtt_port=free_port(),
        admin_key=ADMIN_KEY,
        # Long periods: between wake-ups the workers sit in their wait (provisioning settles
        # for half its interval before it waits).
        ingest_flush_interval_s=60,
        provisioning_interval_s=1,
        rollout_tick_s=60,
    )
    control_plane = ControlPlane(settings)
    await control_plane.open()
    try:
        yield control_plane.services
    finally:
        # A query the cancellation cut short still ends in aiosqlite's thread: let it, before
        # the loop closes (else it reports "Event loop is closed" from that thread).
        await asyncio.sleep(0.2)
        await control_plane.close()


def waiting(task: asyncio.Task[None]) -> bool:
    """Whether the task is suspended in an `Event.wait` (its chain of awaited coroutines)."""
    awaited: Any = task.get_coro()
    while awaited is not None:
        code = getattr(awaited, "cr_code", None)
        if code is not None and code.co_name == "wait":
            return True
        awaited = getattr(awaited, "cr_await", None)
    return False


@pytest.mark.parametrize("name", WORKERS)
async def test_a_worker_woken_just_before_shutdown_still_stops(services: Services, name: str):
    run, wake = WORKERS[name](services)
    for turns in range(4):
        task = asyncio.create_task(run(), name=name)
        await wait_until(lambda: waiting(task), 10, f"{name} to wait for work")  # noqa: B023
        wake()
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        await finish_within(asyncio.wait({task}), 10, f"{name}, cancelled {turns} turns after its wake-up")
        assert task.cancelled()
