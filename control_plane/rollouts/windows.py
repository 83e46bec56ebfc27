"""Maintenance windows: may a store's devices be changed at this instant?

A store is in its window while it is closed per its trading hours, in its own time zone
(`control_plane.stores.trading_hours.is_open`, zoneinfo: DST-correct, the local wall-clock
time of an instant is unambiguous), or, when a rollout gives `maintenance_hours` (written
like trading hours), while those are "open". A store without trading hours is treated as
always in its window: "always trading" would otherwise mean "never changed" unless every
rollout said "now".
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from control_plane.stores.trading_hours import TradingHoursError, is_open, normalize


def normalize_hours(value: Any, *, field: str) -> dict[str, list[list[str]]] | None:
    """Maintenance hours as operators write them ({"mon-fri": "01:00-05:00", …}), normalized.

    Raises ValueError (what pydantic validators turn into a 422 with the field)."""
    try:
        return normalize(value, field=field)
    except TradingHoursError as exc:
        raise ValueError(exc.message) from exc


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
