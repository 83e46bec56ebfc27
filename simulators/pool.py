"""Where the shards run: in the driver's own event loop, or one per worker process (`--procs`).

Both give the driver the same calls (`enroll`, `start`, `start_faults`, `mark_cpu`, `stop`),
each returning when every shard has done it; events reach `on_event` in the driver's loop.
Worker processes are started with *spawn* (no inherited event loop, sockets or threads) and
send their events in batches every few milliseconds, so 10,000 agents do not mean 10,000
pickles per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from simulators.shard import Event, Shard, ShardConfig, run_worker_loop

logger = logging.getLogger(__name__)

BATCH_INTERVAL_S = 0.02


class ShardError(RuntimeError):
    """A shard (or its worker process) failed; the message says which and why."""


class ShardPool(Protocol):
    async def enroll(self) -> None: ...
    async def start(self) -> None: ...
    async def start_faults(self, started: float) -> None: ...
    async def mark_cpu(self, name: str) -> None: ...
    async def stop(self) -> None: ...


class LocalPool:
    """One shard in this process and loop (`--procs 1`)."""

    def __init__(self, config: ShardConfig, on_event: Callable[[Event], None]) -> None:
        self._shard = Shard(config, on_event)

    async def enroll(self) -> None:
        await self._shard.enroll()

    async def start(self) -> None:
        self._shard.start()

    async def start_faults(self, started: float) -> None:
        self._shard.start_faults(started)

    async def mark_cpu(self, name: str) -> None:
        self._shard.mark_cpu(name)

    async def stop(self) -> None:
        await self._shard.stop()


def _worker_main(config: ShardConfig, commands: Any, events: Any) -> None:
    """Entry point of a worker process."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pending: list[Event] = []
    lock = threading.Lock()
    done = threading.Event()

    def emit(event: Event) -> None:
        with lock:
            pending.append(event)
        if event[0] in ("ack", "error", "final"):
            flush()

    def flush() -> None:
        with lock:
            batch = pending[:]
            pending.clear()
        if batch:
            events.put(batch)

    def flusher() -> None:
        while not done.wait(BATCH_INTERVAL_S):
            flush()

    thread = threading.Thread(target=flusher, daemon=True)
    thread.start()
    try:
        asyncio.run(run_worker_loop(config, emit, commands.get))
    finally:
        done.set()
        thread.join()
        flush()


class ProcessPool:
    """One shard per spawned worker process."""

    def __init__(self, configs: Sequence[ShardConfig], on_event: Callable[[Event], None]) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._events: Any = self._context.Queue()
        self._commands: list[Any] = [self._context.Queue() for _ in configs]
        self._processes = [
            self._context.Process(
                target=_worker_main, args=(config, commands, self._events), name=f"sim-shard-{config.shard}"
            )
            for config, commands in zip(configs, self._commands, strict=True)
        ]
        self._on_event = on_event
        self._acks: dict[str, set[int]] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._closing = threading.Event()
        self._stopping = False  # workers exiting is expected from now on

    def _read(self) -> None:
        assert self._loop is not None
        while not self._closing.is_set():
            try:
                batch = self._events.get(timeout=0.2)
            except queue.Empty:
                if not any(p.is_alive() for p in self._processes):
                    if self._stopping:
                        return
                    self._loop.call_soon_threadsafe(self._dispatch, [("error", -1, "all workers exited")])
                    return
                continue
            self._loop.call_soon_threadsafe(self._dispatch, batch)

    def _dispatch(self, batch: list[Event]) -> None:
        for event in batch:
            if event[0] == "ack":
                _, shard, command = event
                self._acks.setdefault(command, set()).add(shard)
                waiter = self._waiters.get(command)
                everyone = len(self._acks[command]) == len(self._processes)
                if waiter is not None and everyone and not waiter.done():
                    waiter.set_result(None)
            elif event[0] == "error":
                for waiter in self._waiters.values():
                    if not waiter.done():
                        waiter.set_exception(ShardError(f"worker {event[1]}: {event[2]}"))
                self._on_event(event)
            else:
                self._on_event(event)

    async def _everyone(self, command: str, *arguments: Any, limit_s: float | None = None) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            for process in self._processes:
                process.start()
            self._reader = threading.Thread(target=self._read, daemon=True, name="sim-events")
            self._reader.start()
        self._acks[command] = set()
        waiter = self._loop.create_future()
        self._waiters[command] = waiter
        for commands in self._commands:
            commands.put((command, *arguments))
        try:
            await asyncio.wait_for(waiter, limit_s)
        finally:
            del self._waiters[command]

    async def enroll(self) -> None:
        await self._everyone("enroll")

    async def start(self) -> None:
        await self._everyone("start")

    async def start_faults(self, started: float) -> None:
        await self._everyone("faults", started)

    async def mark_cpu(self, name: str) -> None:
        await self._everyone("mark_cpu", name)

    async def stop(self) -> None:
        self._stopping = True
        try:
            if self._loop is not None:
                with contextlib.suppress(ShardError, TimeoutError):
                    await self._everyone("stop", limit_s=60)
        finally:
            deadline = time.monotonic() + 10
            for process in self._processes:
                if process.pid is None:
                    continue
                process.join(timeout=max(0.1, deadline - time.monotonic()))
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=5)
            self._closing.set()
            if self._reader is not None:
                await asyncio.to_thread(self._reader.join, 2)
