"""Trading hours: parse what operators write, keep one normal form, answer "open now?".

Operators (and the fleet data in `stores.csv`) write a JSON object of day or day range →
hours::

    {"mon-sat": "08:00-20:00", "sun": "closed"}
    {"sat-thu": "10:00-22:00", "fri": "14:00-24:00"}      # ranges may wrap the week
    {"mon-sun": "00:00-24:00"}                            # open all day
    {"fri": "18:00-02:00", "sat-thu": "closed"}           # overnight: spills into saturday
    {"mon-fri": "08:00-12:00,13:00-18:00", ...}            # several intervals a day

Every day must be said exactly once (a closed day is ``"closed"``), so a typo never reads
as "closed". Hours are wall-clock times in the store's time zone.

The normal form, stored on stores and templates, has all seven days in order, each a sorted
list of non-overlapping ``[start, end)`` intervals, end possibly ``"24:00"``::

    {"mon": [["08:00", "20:00"]], ..., "sun": []}

It is accepted as input too, so what the API returns can be sent back unchanged.
An overnight interval is split at midnight: its morning part belongs to the next day.

`is_open` converts the instant to the store's local wall-clock time with zoneinfo, so DST
changes and half/quarter-hour offsets (Asia/Kathmandu, Pacific/Chatham, America/St_Johns)
need no special cases: the local time of an instant is always unambiguous. (A wall-clock
time skipped by a DST change simply never happens that day; one repeated is open or closed
both times.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from control_plane.errors import InvalidInput

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY = 24 * 60

TradingHours = dict[str, list[list[str]]]

_TIME = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")
_ALIASES = {"daily": "mon-sun", "everyday": "mon-sun", "weekdays": "mon-fri", "weekend": "sat-sun"}


class TradingHoursError(InvalidInput):
    """Trading hours that cannot be understood: `field` (e.g. ``trading_hours.mon-fri``) and
    `detail` say where and what; the message has both."""

    code = "invalid_trading_hours"

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"field {field!r}: {detail}")
        self.field = field
        self.detail = detail


def normalize(value: Any, *, field: str = "trading_hours") -> TradingHours | None:
    """The normal form of operator-written trading hours; None stays None (always trading)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TradingHoursError(
            field, 'expected an object of day → hours, e.g. {"mon-sat": "08:00-20:00", "sun": "closed"}'
        )
    if len(value) > 14:
        raise TradingHoursError(field, "at most 14 day entries")
    given: set[str] = set()
    minutes: dict[str, list[tuple[int, int]]] = {day: [] for day in DAYS}
    for raw_key, hours in value.items():
        key_field = f"{field}.{raw_key}"
        days = _days(raw_key, field=key_field)
        for day in days:
            if day in given:
                raise TradingHoursError(key_field, f"{day!r} is given more than once")
            given.add(day)
        for start, end in _intervals(hours, field=key_field):
            for day in days:
                if end > start:
                    minutes[day].append((start, end))
                else:  # overnight: the part after midnight belongs to the next day
                    minutes[day].append((start, MINUTES_PER_DAY))
                    if end > 0:
                        minutes[_next(day)].append((0, end))
    missing = [day for day in DAYS if day not in given]
    if missing:
        raise TradingHoursError(field, f'no hours for {", ".join(missing)} (say "closed" for a closed day)')
    return {day: [[_clock(a), _clock(b)] for a, b in _merged(minutes[day])] for day in DAYS}


def is_open(trading_hours: Mapping[str, Any] | None, tz: str, at: datetime) -> bool:
    """Whether a store with these (normal-form) hours in zone `tz` trades at instant `at`.

    None means no trading hours are set: always trading (the safe answer for maintenance).
    """
    if at.tzinfo is None:
        raise ValueError("is_open needs a timezone-aware datetime")
    if trading_hours is None:
        return True
    local = at.astimezone(ZoneInfo(tz))
    minute = local.hour * 60 + local.minute
    for start, end in trading_hours.get(DAYS[local.weekday()], ()):
        if _minutes(start) <= minute < _minutes(end):
            return True
    return False


# --- parsing ------------------------------------------------------------------------------


def _days(raw_key: object, *, field: str) -> list[str]:
    if not isinstance(raw_key, str):
        raise TradingHoursError(field, "a day must be a string")
    key = _ALIASES.get(raw_key.strip().lower(), raw_key.strip().lower())
    parts = key.split("-")
    if len(parts) > 2 or any(part not in DAYS for part in parts):
        raise TradingHoursError(
            field,
            f"{raw_key!r} is not a day or day range "
            "(mon, tue, wed, thu, fri, sat, sun, e.g. 'mon-fri' or 'sat-thu')",
        )
    first = DAYS.index(parts[0])
    last = DAYS.index(parts[-1])
    count = (last - first) % 7 + 1  # ranges wrap the week: 'sat-thu' is six days
    return [DAYS[(first + n) % 7] for n in range(count)]


def _intervals(hours: object, *, field: str) -> list[tuple[int, int]]:
    if isinstance(hours, str):
        text = hours.strip().lower()
        if text == "closed":
            return []
        pieces: list[object] = [piece.strip() for piece in text.split(",")]
    elif isinstance(hours, list):  # the normal form: [["08:00", "20:00"], ...]
        pieces = list(hours)
    else:
        raise TradingHoursError(field, f"expected 'HH:MM-HH:MM', '00:00-24:00' or 'closed', got {hours!r}")
    if len(pieces) > 8:
        raise TradingHoursError(field, "at most 8 intervals a day")
    return [_interval(piece, field=field) for piece in pieces]


def _interval(piece: object, *, field: str) -> tuple[int, int]:
    if isinstance(piece, str):
        bounds: list[object] = list(piece.split("-"))
    elif isinstance(piece, list):
        bounds = list(piece)
    else:
        bounds = []
    if len(bounds) != 2 or not all(isinstance(b, str) for b in bounds):
        raise TradingHoursError(field, f"{piece!r} is not an interval like '08:00-20:00'")
    start, end = (_parse_time(str(b).strip(), field=field) for b in bounds)
    if start == MINUTES_PER_DAY:
        raise TradingHoursError(field, "an interval cannot start at 24:00")
    if start == end:
        raise TradingHoursError(
            field, f"{piece!r} is empty (use '00:00-24:00' for open all day, 'closed' for closed)"
        )
    return start, end


def _parse_time(text: str, *, field: str) -> int:
    match = _TIME.match(text)
    if match is None:
        raise TradingHoursError(field, f"{text!r} is not a time HH:MM (00:00 to 24:00)")
    value = int(match.group(1)) * 60 + int(match.group(2))
    if value > MINUTES_PER_DAY:
        raise TradingHoursError(field, f"{text!r} is past 24:00")
    return value


def _next(day: str) -> str:
    return DAYS[(DAYS.index(day) + 1) % 7]


def _merged(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or touching intervals joined."""
    result: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _minutes(text: str) -> int:
    hours, _, minutes = text.partition(":")
    return int(hours) * 60 + int(minutes)
