"""Reconnect delays: exponential backoff with jitter, as a pure function.

Attempt 1 waits between `minimum` and 2 * `minimum`, attempt n between `minimum` and
min(`maximum`, `minimum` * 2**n). The random spread ("full jitter" above the floor) keeps a
fleet that lost its broker at the same instant from coming back at the same instant.
"""

from __future__ import annotations

import random

_MAX_EXPONENT = 62  # beyond this the cap is `maximum` anyway; avoids float overflow


def backoff_delay(attempt: int, *, minimum: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt `attempt` (1 for the first retry)."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if not 0 < minimum <= maximum:
        raise ValueError("need 0 < minimum <= maximum")
    cap = min(maximum, minimum * 2.0 ** min(attempt, _MAX_EXPONENT))
    return rng.uniform(minimum, cap)
