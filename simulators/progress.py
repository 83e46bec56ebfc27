"""Live progress on the terminal (rich), fed by the driver's phases and the shards' events."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from simulators.scenarios import Driver

REFRESH_S = 0.1


class LiveProgress:
    """One bar per phase: enrolled, applied, reconnected … or elapsed seconds of a timed phase."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<40}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            refresh_per_second=5,
        )
        self._task: Any = None
        self._name = ""
        self._driver: Driver | None = None
        self._timed: tuple[float, float] | None = None
        self._updated = 0.0

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._refresh(force=True)
        self._progress.stop()

    def phase(self, name: str, total: int | None, *, total_s: float | None, driver: Driver) -> None:
        self._refresh(force=True)
        self._driver, self._name = driver, name
        self._timed = (time.monotonic(), total_s) if total_s is not None else None
        self._task = self._progress.add_task(name, total=total if total is not None else total_s, detail="")

    def event(self, _event: tuple[Any, ...]) -> None:
        self._refresh()

    def _refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._task is None or self._driver is None or (not force and now - self._updated < REFRESH_S):
            return
        self._updated = now
        recorder = self._driver.recorder
        detail = f"connected {recorder.connected_count}"
        if self._timed is not None:
            started, total_s = self._timed
            completed: float = min(total_s, now - started)
            detail += f", faults {len(recorder.faults)}" if recorder.faults else ""
        elif self._name == "enroll":
            completed = len(recorder.devices)
        elif self._name.startswith("change"):
            completed = recorder.settled_count(self._driver.baseline)
        elif self._name.startswith("reconnected"):
            completed = recorder.connected_count
        else:
            completed = recorder.applied_count()
        self._progress.update(self._task, completed=completed, detail=detail)
