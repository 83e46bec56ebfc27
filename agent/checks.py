"""App checks: is the store software actually working, not just the machine?

The desired state declares them (`DesiredState.checks`, name → `AppCheck`):

* ``process``: a process with this name runs (psutil; the name, or the base name of its
  first argument, so ``python3 -m pos`` can be found as ``pos`` only by its name);
* ``tcp``: ``host:port`` accepts a connection (asyncio, no thread);
* ``http``: the URL answers ``expect_status`` (aiohttp, redirects not followed).

Each check has its own `timeout_s`; a check that times out or errors is failed, never raised.

`LiveChecks` runs them for real; `SimulatedChecks` answers from a forced outcome (all pass,
some named ones fail, or all fail) for the simulator. `CheckScheduler` runs the checks in
force, each every `interval_s`, and keeps the latest `CheckResult` of each for the health
report. `verify` runs a new document's checks once after it was applied (grace, retries):
the post-apply gate of `agent.pipeline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

import psutil

from protocol.messages import AppCheck, AppCheckKind, CheckResult, DesiredState

if TYPE_CHECKING:
    import aiohttp

_DETAIL_MAX = 200


class CheckRunner(Protocol):
    async def run(self, name: str, check: AppCheck) -> CheckResult:
        """Run `check` once (within its timeout); failures are results, not exceptions."""
        ...

    async def close(self) -> None: ...


def _result(name: str, ok: bool, detail: str = "") -> CheckResult:
    return CheckResult(name=name, ok=ok, detail=detail[:_DETAIL_MAX])


class LiveChecks:
    """Runs checks against the real machine. One aiohttp session, opened at the first http
    check (aiohttp is imported only then) and closed by `close()`."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def run(self, name: str, check: AppCheck) -> CheckResult:
        try:
            async with asyncio.timeout(check.timeout_s):
                if check.kind is AppCheckKind.TCP:
                    detail = await self._tcp(check.target)
                elif check.kind is AppCheckKind.HTTP:
                    detail = await self._http(check.target, check.expect_status)
                else:
                    detail = await asyncio.to_thread(_process_missing, check.target)
        except TimeoutError:
            return _result(name, False, f"timed out after {check.timeout_s:g}s")
        except OSError as exc:
            return _result(name, False, f"{type(exc).__name__}: {exc.strerror or exc}")
        except Exception as exc:
            # aiohttp's errors and anything unexpected: a failed check, never a crashed agent.
            return _result(name, False, f"{type(exc).__name__}: {exc}")
        return _result(name, detail is None, detail or "")

    async def _tcp(self, target: str) -> str | None:
        host, _, port = target.rpartition(":")
        _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    async def _http(self, url: str, expect_status: int) -> str | None:
        import aiohttp  # only agents with http checks pay for it

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4, force_close=True),
                timeout=aiohttp.ClientTimeout(total=None),  # each check has its own timeout
            )
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status != expect_status:
                return f"HTTP {response.status}, expected {expect_status}"
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _process_missing(name: str) -> str | None:
    """None if a process called `name` runs (reads /proc: on a worker thread)."""
    for process in psutil.process_iter(["name", "cmdline"]):
        info = process.info
        if info.get("name") == name:
            return None
        cmdline = info.get("cmdline") or []
        if cmdline and os.path.basename(cmdline[0]) == name:
            return None
    return f"no process named {name!r}"


class SimulatedChecks:
    """Forced outcomes for simulated devices: every check passes unless `fail_all` is set or
    its name is in `failing`. Change either at any time; the next run sees it."""

    def __init__(self, *, failing: Iterable[str] = (), fail_all: bool = False) -> None:
        self.failing: set[str] = set(failing)
        self.fail_all = fail_all
        self.runs = 0

    async def run(self, name: str, check: AppCheck) -> CheckResult:
        self.runs += 1
        if self.fail_all or name in self.failing:
            return _result(name, False, f"simulated {check.kind.value} check failure")
        return _result(name, True)

    async def close(self) -> None:
        return None


class CheckScheduler:
    """Runs the checks in force, each in its own task every `interval_s`, keeping the latest
    result of each. `update()` swaps the set (a changed check starts afresh, a removed one
    is forgotten); `run()` owns the tasks and returns only when cancelled."""

    def __init__(self, runner: CheckRunner) -> None:
        self.runner = runner
        self._checks: dict[str, AppCheck] = {}
        self._results: dict[str, CheckResult] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False

    @property
    def checks(self) -> dict[str, AppCheck]:
        return dict(self._checks)

    def results(self) -> list[CheckResult]:
        """The latest result of each check in force that has run at least once, by name."""
        return [self._results[name] for name in sorted(self._results)]

    def update(self, checks: Mapping[str, AppCheck]) -> None:
        for name in list(self._checks):
            if checks.get(name) != self._checks[name]:
                self._stop(name)
        for name, check in checks.items():
            if name not in self._checks:
                self._checks[name] = check
                if self._running:
                    self._start(name, check)

    async def run(self) -> None:
        self._running = True
        for name, check in self._checks.items():
            self._start(name, check)
        try:
            await asyncio.Event().wait()  # the work is in the per-check tasks
        finally:
            self._running = False
            tasks = list(self._tasks.values())
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.runner.close()

    def _start(self, name: str, check: AppCheck) -> None:
        self._tasks[name] = asyncio.create_task(self._every(name, check), name=f"check:{name}")

    def _stop(self, name: str) -> None:
        del self._checks[name]
        self._results.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()  # it only sleeps or runs a bounded check; nothing to wait for

    async def _every(self, name: str, check: AppCheck) -> None:
        while True:
            result = await self.runner.run(name, check)
            if self._checks.get(name) == check:
                self._results[name] = result
            await asyncio.sleep(check.interval_s)


async def verify(
    runner: CheckRunner, desired: DesiredState, *, grace_s: float, attempts: int, retry_s: float
) -> str | None:
    """The post-apply gate: after `grace_s`, run every check of `desired` once; retry the
    failing ones up to `attempts` times in all, `retry_s` apart. None if all pass, else
    which failed and why."""
    pending = dict(desired.checks)
    if not pending:
        return None
    await asyncio.sleep(grace_s)
    failed: list[CheckResult] = []
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(retry_s)
        results = await asyncio.gather(*(runner.run(name, check) for name, check in pending.items()))
        failed = [result for result in results if not result.ok]
        if not failed:
            return None
        pending = {result.name: pending[result.name] for result in failed}
    return "; ".join(f"check {result.name!r} failed: {result.detail}" for result in failed)
