"""Waiting without losing a cancellation.

On Python 3.11 `asyncio.wait_for` swallows a cancellation that arrives while the awaited
thing has just finished (it returns the result instead of raising). A worker loop waiting
like that on its wake-up event, woken just as the control plane shuts down, would never end,
and shutdown would wait for it forever. `asyncio.timeout` does not have that flaw.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set (True) or `timeout_s` passes (False)."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


def raise_if_cancelled() -> None:
    """Honour a cancellation a library caught and dropped (aiomqtt's timeouts are
    `asyncio.wait_for`): the task still counts it in `cancelling()`."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
