"""Per-source rate limit for `/v1/enroll`: a token bucket per client address.

Enrollment is the one unauthenticated write endpoint; the limit bounds token guessing and
keeps one misbehaving store network from starving the rest. A store behind one NAT address
enrolling all its devices at once fits in the burst.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 100_000,
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._max_sources = max_sources
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, source: str) -> float:
        """Take one token for `source`: 0.0 if allowed, else the seconds until one is available."""
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self._max_sources:
                self._evict(now)
            bucket = self._buckets[source] = _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self._rate

    def _evict(self, now: float) -> None:
        """Drop buckets that have refilled completely (they hold no state worth keeping)."""
        full_after = self._burst / self._rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < full_after}
