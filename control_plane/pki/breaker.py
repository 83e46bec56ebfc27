"""A circuit breaker for the CA backend: fail fast while it is down, probe it, recover by itself.

    CLOSED ──(failure_threshold consecutive failures)──▶ OPEN
    OPEN ──(reset_after_s elapsed; the next call is the trial)──▶ HALF_OPEN
    HALF_OPEN ──(trial succeeds)──▶ CLOSED
    HALF_OPEN ──(trial fails)──▶ OPEN (a fresh cool-down)

While OPEN, and in HALF_OPEN while the trial is in flight, `before_call` raises `CAUnavailable`
at once (HTTP 503 + Retry-After) instead of letting every enrollment wait for the backend's
timeout. A failure is what says "the backend cannot serve": a timeout, a connection error, a
5xx or a sealed Vault. A refused CSR is the caller's fault and counts as a success.

Used from one event loop only (no locks); the clock is injected so tests need no sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

from control_plane.errors import CAUnavailable

logger = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        name: str = "certificate authority",
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_after_s <= 0:
            raise ValueError("reset_after_s must be positive")
        self._threshold = failure_threshold
        self._reset_after_s = reset_after_s
        self._clock = clock
        self._name = name
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._cool_down_left() <= 0:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after_s(self) -> float:
        """How long a refused caller should wait before trying again (0 when calls go through)."""
        if self._state is BreakerState.CLOSED:
            return 0.0
        return max(self._cool_down_left(), 0.0)

    def before_call(self) -> None:
        """Admit a call or raise `CAUnavailable`; an admitted call must end in exactly one of
        `record_success`, `record_failure` or `abandon`."""
        if self._state is BreakerState.CLOSED:
            return
        if self._state is BreakerState.OPEN:
            if self._cool_down_left() > 0:
                raise self._refusal()
            self._state = BreakerState.HALF_OPEN
            logger.info("%s: circuit half-open, trying one call", self._name)
        if self._trial_in_flight:
            raise self._refusal()
        self._trial_in_flight = True

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            logger.warning("%s: answering again, circuit closed", self._name)
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_in_flight = False
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._failures >= self._threshold
        ):
            if self._state is BreakerState.CLOSED:
                logger.warning(
                    "%s: %d consecutive failures, circuit open for %gs",
                    self._name,
                    self._failures,
                    self._reset_after_s,
                )
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()

    def abandon(self) -> None:
        """The admitted call ended without a verdict (cancelled, or a bug): count nothing."""
        self._trial_in_flight = False

    def _cool_down_left(self) -> float:
        return self._opened_at + self._reset_after_s - self._clock()

    def _refusal(self) -> CAUnavailable:
        wait = self.retry_after_s()
        detail = f"retrying in {wait:.0f}s" if wait > 0 else "a trial call is in progress"
        return CAUnavailable(
            f"{self._name} unavailable after {self._failures} consecutive failures ({detail})",
            retry_after_s=max(wait, 1.0),
        )
