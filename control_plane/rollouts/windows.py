"""Maintenance windows: may a store's devices be changed at this instant?

A store is in its window while it is closed per its trading hours, in its own time zone
(zoneinfo: DST-correct, the local wall-clock time of an instant is unambiguous), or, when a
rollout gives `maintenance_hours` (the trading-hours normal form), while those are "open".
A store without trading hours is treated as always in its window: "always trading" would
otherwise mean "never changed" unless every rollout said "now".

`is_open` has the signature of `control_plane.stores.trading_hours.is_open` (built on the
provisioning branch, not merged when this was written): swap the import once it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def is_open(trading_hours: Mapping[str, Any] | None, tz: str, at: datetime) -> bool:
    """Whether a store with these (normal-form) hours in zone `tz` trades at instant `at`."""
    if at.tzinfo is None:
        raise ValueError("is_open needs a timezone-aware datetime")
    if trading_hours is None:
        return True
    local = at.astimezone(ZoneInfo(tz))
    minute = local.hour * 60 + local.minute
    return any(
        _minutes(start) <= minute < _minutes(end)
        for start, end in trading_hours.get(DAYS[local.weekday()], ())
    )


def normalize_hours(value: Any, *, field: str) -> dict[str, list[list[str]]] | None:
    """Check maintenance hours in the normal form {"mon": [["01:00", "05:00"]], …, "sun": []}."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != set(DAYS):
        raise ValueError(f"field {field!r}: give all seven days, e.g. {{'mon': [['01:00', '05:00']], …}}")
    hours: dict[str, list[list[str]]] = {}
    for day in DAYS:
        intervals = value[day]
        if not isinstance(intervals, list):
            raise ValueError(f"field {field}.{day!r}: a list of [start, end] pairs")  # noqa: TRY004 (pydantic wants ValueError)
        for pair in intervals:
            ok = (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(t, str) and _TIME.match(t) for t in pair)
            )
            if not ok or _minutes(pair[0]) >= _minutes(pair[1]) or _minutes(pair[1]) > 24 * 60:
                raise ValueError(f'field {field}.{day!r}: {pair!r} is not an ["HH:MM", "HH:MM"] interval')
        hours[day] = [list(pair) for pair in intervals]
    return hours


def in_window(
    *,
    window: str,
    trading_hours: Mapping[str, Any] | None,
    timezone: str,
    maintenance_hours: Mapping[str, Any] | None,
    at: datetime,
) -> bool:
    if window == "now":
        return True
    if maintenance_hours is not None:
        return is_open(maintenance_hours, timezone, at)
    if trading_hours is None:
        return True
    return not is_open(trading_hours, timezone, at)
