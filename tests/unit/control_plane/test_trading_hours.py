"""Trading hours: the operators' format, the normal form, and `is_open` in hard time zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.stores.trading_hours import TradingHoursError, is_open, normalize
from tests.support import fleet_data

CLOSED_SUNDAYS = {"mon-sat": "08:00-20:00", "sun": "closed"}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_day_ranges_become_seven_days_in_order():
    assert normalize(CLOSED_SUNDAYS) == {
        "mon": [["08:00", "20:00"]],
        "tue": [["08:00", "20:00"]],
        "wed": [["08:00", "20:00"]],
        "thu": [["08:00", "20:00"]],
        "fri": [["08:00", "20:00"]],
        "sat": [["08:00", "20:00"]],
        "sun": [],
    }


def test_a_range_may_wrap_the_week_for_friday_saturday_weekends():
    hours = normalize({"sat-thu": "10:00-22:00", "fri": "14:00-24:00"})
    assert hours is not None
    assert [day for day, spans in hours.items() if spans == [["10:00", "22:00"]]] == [
        "mon",
        "tue",
        "wed",
        "thu",
        "sat",
        "sun",
    ]
    assert hours["fri"] == [["14:00", "24:00"]]


def test_overnight_hours_spill_into_the_next_morning():
    hours = normalize({"fri": "18:00-02:00", "sat": "10:00-18:00", "sun-thu": "closed"})
    assert hours is not None
    assert hours["fri"] == [["18:00", "24:00"]]
    assert hours["sat"] == [["00:00", "02:00"], ["10:00", "18:00"]]
    # Friday 01:00 belongs to Thursday night, which is closed.
    assert hours["thu"] == []


def test_sunday_night_spills_into_monday_and_merges():
    hours = normalize({"sun": "20:00-03:00", "mon-sat": "02:00-10:00"})
    assert hours is not None
    assert hours["mon"] == [["00:00", "10:00"]]


def test_several_intervals_a_day_and_the_normal_form_round_trips():
    given = {"mon-fri": "08:00-12:00, 13:00-18:00", "sat-sun": "closed"}
    hours = normalize(given)
    assert hours is not None
    assert hours["wed"] == [["08:00", "12:00"], ["13:00", "18:00"]]
    assert normalize(hours) == hours


def test_every_store_in_the_fleet_data_normalises():
    stores = fleet_data.stores()
    assert len(stores) == 1000
    for store in stores:
        hours = normalize(store["trading_hours"])
        assert hours is not None
        assert set(hours) == {"mon", "tue", "wed", "thu", "fri", "sat", "sun"}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"mon-sat": "08:00-20:00"}, "no hours for sun"),
        ({"mon-sun": "08:00-20:00", "sun": "closed"}, "'sun' is given more than once"),
        ({"mon-sund": "08:00-20:00"}, "is not a day or day range"),
        ({"mon-sun": "8-20"}, "is not a time HH:MM"),
        ({"mon-sun": "08:00-24:30"}, "is past 24:00"),
        ({"mon-sun": "25:00-26:00"}, "is not a time HH:MM"),
        ({"mon-sun": "08:00-08:00"}, "is empty"),
        ({"mon-sun": "24:00-02:00"}, "cannot start at 24:00"),
        ({"mon-sun": 8}, "expected 'HH:MM-HH:MM'"),
        ({"mon-sun": "open"}, "is not an interval"),
        (["mon", "08:00-20:00"], "expected an object"),
    ],
)
def test_bad_hours_are_refused_with_the_field_named(given, message):
    with pytest.raises(TradingHoursError) as caught:
        normalize(given)
    assert message in caught.value.message
    assert "trading_hours" in caught.value.message


def test_no_trading_hours_means_always_trading():
    assert normalize(None) is None
    assert is_open(None, "Europe/Berlin", utc("2026-12-25T03:00:00"))


def test_naive_instants_are_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        is_open(normalize(CLOSED_SUNDAYS), "Europe/Berlin", datetime(2026, 1, 1, 12))  # noqa: DTZ001


def test_kathmandu_quarter_hour_offset():
    hours = normalize({"mon-sun": "10:00-20:00"})
    # +05:45: 10:00 local is 04:15 UTC, 20:00 local is 14:15 UTC.
    assert not is_open(hours, "Asia/Kathmandu", utc("2026-06-01T04:14:59"))
    assert is_open(hours, "Asia/Kathmandu", utc("2026-06-01T04:15:00"))
    assert is_open(hours, "Asia/Kathmandu", utc("2026-06-01T14:14:00"))
    assert not is_open(hours, "Asia/Kathmandu", utc("2026-06-01T14:15:00"))


def test_chatham_weekday_is_the_local_one_in_summer_and_winter():
    hours = normalize({"mon-fri": "09:00-17:00", "sat-sun": "closed"})
    # Sunday evening in UTC is already Monday morning in Chatham: +13:45 in January (DST) ...
    assert is_open(hours, "Pacific/Chatham", utc("2026-01-11T19:15:00"))
    assert not is_open(hours, "Pacific/Chatham", utc("2026-01-11T19:14:00"))
    # ... and +12:45 in July: the same UTC time is still 08:00 Monday, closed.
    assert not is_open(hours, "Pacific/Chatham", utc("2026-07-12T19:15:00"))
    assert is_open(hours, "Pacific/Chatham", utc("2026-07-12T20:15:00"))


def test_sydney_spring_forward_uses_the_new_offset():
    hours = normalize({"mon-sun": "08:00-20:00"})
    # Sunday 4 October 2026 02:00 AEST becomes 03:00 AEDT. 21:30 UTC on the 3rd is 08:30 AEDT
    # (open); with the old +10:00 it would wrongly be 07:30.
    assert is_open(hours, "Australia/Sydney", utc("2026-10-03T21:30:00"))
    assert not is_open(hours, "Australia/Sydney", utc("2026-10-02T21:30:00"))  # 07:30 AEST


def test_sydney_skipped_hour_and_repeated_hour():
    night = normalize({"sun": "01:00-02:30", "mon-sat": "closed"})
    # 4 October 2026: 01:59 AEST, then straight to 03:00 AEDT: the rest of the window is gone.
    assert is_open(night, "Australia/Sydney", utc("2026-10-03T15:59:00"))
    assert not is_open(night, "Australia/Sydney", utc("2026-10-03T16:00:00"))
    # 5 April 2026: 02:00-03:00 happens twice (AEDT, then AEST); 02:30 is closed both times,
    # 02:29 open both times.
    for moment in ("2026-04-04T15:29:00", "2026-04-04T16:29:00"):
        assert is_open(night, "Australia/Sydney", utc(moment))
    for moment in ("2026-04-04T15:30:00", "2026-04-04T16:30:00"):
        assert not is_open(night, "Australia/Sydney", utc(moment))


def test_st_johns_half_hour_offset_across_its_dst_change():
    hours = normalize({"mon-fri": "09:00-17:00", "sat-sun": "closed"})
    # -03:30 before 8 March 2026, -02:30 after: 11:45 UTC is 08:15 then 09:15.
    assert not is_open(hours, "America/St_Johns", utc("2026-03-02T11:45:00"))
    assert is_open(hours, "America/St_Johns", utc("2026-03-09T11:45:00"))


def test_open_all_day_and_overnight_across_midnight():
    always = normalize({"mon-sun": "00:00-24:00"})
    start = utc("2026-03-28T00:00:00")
    for hour in range(0, 72, 5):
        assert is_open(always, "Europe/London", start + timedelta(hours=hour))
    late = normalize({"fri-sat": "20:00-02:00", "sun-thu": "closed"})
    # Saturday 01:30 in Berlin (Friday night's spill) is open, Sunday 01:30 too, Monday 01:30 not.
    # (CEST, +02:00: 01:30 local is 23:30 UTC the evening before.)
    assert is_open(late, "Europe/Berlin", utc("2026-06-05T23:30:00"))
    assert is_open(late, "Europe/Berlin", utc("2026-06-06T23:30:00"))
    assert not is_open(late, "Europe/Berlin", utc("2026-06-07T23:30:00"))
    assert not is_open(late, "Europe/Berlin", utc("2026-06-06T00:30:00"))  # 02:30: closed
