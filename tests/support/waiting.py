"""Waiting in tests for something that happens in the background."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def stuck_tasks_report() -> str:
    """Every pending task of the running loop with the frame it waits in (for a hang's error)."""
    current = asyncio.current_task()
    lines: list[str] = []
    for task in asyncio.all_tasks():
        if task is current or task.done():
            continue
        lines.append(f"- task {task.get_name()}: {task.get_coro()!r}")
        lines.extend(
            f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
            for frame in task.get_stack()
        )
    return "\n".join(lines) or "(no other task)"


async def finish_within(awaitable: Awaitable[T], timeout: float, what: str) -> T:
    """Await `awaitable`; if it takes longer than `timeout`, fail naming `what` and every task
    still waiting, with its stack (a hang in a fixture's teardown otherwise shows only as
    pytest's timeout, with thread stacks that say nothing about asyncio tasks)."""
    work = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({work}, timeout=timeout)
    if work in done:
        return work.result()
    report = stuck_tasks_report()  # before cancelling: the stacks show where it hangs
    work.cancel()
    await asyncio.wait({work}, timeout=5)
    raise AssertionError(f"{what} did not finish within {timeout}s; tasks still waiting:\n{report}")
