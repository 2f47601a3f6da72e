"""engine.routing.schedule: window ids (DST included), the window clock, schedules and day caps."""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from engine.core.config import WEEKDAYS, Caps, Schedule
from engine.core.errors import ConfigError
from engine.routing.schedule import (
    EPOCH_DAY,
    CompiledSchedule,
    WindowClock,
    Windows,
    check_caps,
    daily_cap,
    windows,
)

UTC = datetime.UTC
NY = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
KOLKATA = ZoneInfo("Asia/Kolkata")  # +05:30: hours do not align with UTC hours


def utc(*args: int) -> datetime.datetime:
    return datetime.datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def hour_id(year: int, month: int, day: int, hour: int) -> int:
    return (datetime.date(year, month, day).toordinal() - EPOCH_DAY) * 24 + hour


def test_epoch() -> None:
    assert EPOCH_DAY == 719163
    assert windows(utc(1970, 1, 1, 0, 0), ZoneInfo("UTC")) == Windows(
        hour=0, day=EPOCH_DAY, week=197001, month=197001, weekday=3
    )


@pytest.mark.parametrize(
    ("now", "tz", "local"),
    [
        # plain conversions
        (utc(2026, 6, 15, 12, 30), NY, (2026, 6, 15, 8)),
        (utc(2026, 1, 1, 3, 0), NY, (2025, 12, 31, 22)),  # previous day, month and year
        (utc(2026, 1, 1, 3, 0), TOKYO, (2026, 1, 1, 12)),
        (utc(2025, 12, 31, 20, 0), TOKYO, (2026, 1, 1, 5)),  # already next year in Tokyo
        (utc(2026, 6, 15, 18, 45), KOLKATA, (2026, 6, 16, 0)),
        # DST spring forward in New York: 2026-03-08 02:00 EST -> 03:00 EDT
        (utc(2026, 3, 8, 6, 59), NY, (2026, 3, 8, 1)),
        (utc(2026, 3, 8, 7, 0), NY, (2026, 3, 8, 3)),  # local hour 2 does not exist
        (utc(2026, 3, 9, 3, 59), NY, (2026, 3, 8, 23)),
        (utc(2026, 3, 9, 4, 0), NY, (2026, 3, 9, 0)),  # day ends 4:00Z now (EDT)
        # DST fall back: 2026-11-01 02:00 EDT -> 01:00 EST, 01:xx happens twice
        (utc(2026, 11, 1, 4, 0), NY, (2026, 11, 1, 0)),
        (utc(2026, 11, 1, 5, 30), NY, (2026, 11, 1, 1)),  # first 01:30 (EDT)
        (utc(2026, 11, 1, 6, 30), NY, (2026, 11, 1, 1)),  # second 01:30 (EST)
        (utc(2026, 11, 1, 7, 0), NY, (2026, 11, 1, 2)),
        (utc(2026, 11, 2, 4, 59), NY, (2026, 11, 1, 23)),  # a 25-hour day
        (utc(2026, 11, 2, 5, 0), NY, (2026, 11, 2, 0)),
    ],
)
def test_hour_day_month_in_zone(
    now: datetime.datetime, tz: ZoneInfo, local: tuple[int, int, int, int]
) -> None:
    year, month, day, hour = local
    w = windows(now, tz)
    assert w.hour == hour_id(year, month, day, hour)
    assert w.day == datetime.date(year, month, day).toordinal()
    assert w.month == year * 100 + month
    assert w.weekday == datetime.date(year, month, day).weekday()


def test_spring_forward_skips_an_hour_id() -> None:
    before = windows(utc(2026, 3, 8, 6, 59), NY)
    after = windows(utc(2026, 3, 8, 7, 0), NY)
    assert after.hour - before.hour == 2
    assert after.day == before.day


def test_fall_back_repeated_hour_shares_an_id() -> None:
    ids = {windows(utc(2026, 11, 1, 5, m), NY).hour for m in (0, 59)}
    ids |= {windows(utc(2026, 11, 1, 6, m), NY).hour for m in (0, 59)}
    assert ids == {hour_id(2026, 11, 1, 1)}
    assert windows(utc(2026, 11, 1, 7, 0), NY).hour == hour_id(2026, 11, 1, 2)


@pytest.mark.parametrize(
    ("local_date", "week"),
    [
        (datetime.date(2026, 1, 1), 202601),  # Thursday: week 1 of 2026
        (datetime.date(2027, 1, 1), 202653),  # Friday: still ISO 2026-W53
        (datetime.date(2027, 1, 3), 202653),  # Sunday
        (datetime.date(2027, 1, 4), 202701),  # Monday
        (datetime.date(2024, 12, 30), 202501),  # Monday in December, ISO 2025-W01
        (datetime.date(2021, 1, 3), 202053),
    ],
)
def test_iso_week(local_date: datetime.date, week: int) -> None:
    now = datetime.datetime.combine(local_date, datetime.time(12), tzinfo=NY).astimezone(UTC)
    w = windows(now, NY)
    assert w.week == week
    assert w.month == local_date.year * 100 + local_date.month


def test_week_rolls_at_local_midnight() -> None:
    # Sunday 23:59 in New York is already Monday in UTC: the NY week must not roll yet
    sunday = windows(utc(2026, 3, 16, 3, 59), NY)
    monday = windows(utc(2026, 3, 16, 4, 0), NY)
    assert (sunday.weekday, monday.weekday) == (6, 0)
    assert (sunday.week, monday.week) == (202611, 202612)


def test_windows_accept_any_aware_datetime() -> None:
    paris = datetime.datetime(2026, 6, 15, 14, 30, tzinfo=ZoneInfo("Europe/Paris"))
    assert windows(paris, NY) == windows(paris.astimezone(UTC), NY)


def test_windows_refuse_naive_datetime() -> None:
    with pytest.raises(ValueError, match="aware"):
        windows(datetime.datetime(2026, 1, 1), NY)


# --- WindowClock ---------------------------------------------------------------------------


def test_clock_caches_per_second_and_zone() -> None:
    clock = WindowClock()
    t = utc(2026, 11, 1, 5, 59, 59).timestamp()
    first, local = clock.get(NY, t + 0.1)
    assert (first, local) == (windows(utc(2026, 11, 1, 5, 59, 59), NY), local)
    assert local == datetime.datetime(2026, 11, 1, 1, 59, 59, tzinfo=NY)
    assert local.utcoffset() == datetime.timedelta(hours=-4)
    again, local_again = clock.get(NY, t + 0.9)
    assert again is first and local_again is local  # served from the cache
    later, later_local = clock.get(NY, t + 1.0)
    assert later is not first
    assert later.hour == first.hour  # 01:00 EST: the repeated hour shares its id
    assert later_local.utcoffset() == datetime.timedelta(hours=-5)
    tokyo, _ = clock.get(TOKYO, t + 1.0)
    assert tokyo == windows(utc(2026, 11, 1, 6, 0, 0), TOKYO)
    assert clock.get(NY, t + 1.5)[0] is later  # a second zone does not evict the first


def test_clock_floors_before_epoch() -> None:
    _, local = WindowClock().get(ZoneInfo("UTC"), -0.5)
    assert local == datetime.datetime(1969, 12, 31, 23, 59, 59, tzinfo=ZoneInfo("UTC"))


def test_clock_goes_backwards_too() -> None:
    clock = WindowClock()
    t = utc(2026, 3, 1).timestamp()
    clock.get(NY, t)
    assert clock.get(NY, t - 3600)[0] == windows(utc(2026, 2, 28, 23), NY)


# --- CompiledSchedule ------------------------------------------------------------------


def at(weekday: str, hhmm: str) -> datetime.datetime:
    """A NY local datetime in the week of Monday 2026-06-15."""
    day = datetime.date(2026, 6, 15) + datetime.timedelta(days=WEEKDAYS.index(weekday))
    hour, minute = map(int, hhmm.split(":"))
    return datetime.datetime.combine(day, datetime.time(hour, minute), tzinfo=NY)


WEEKDAYS_9_TO_5 = Schedule(days=["mon", "tue", "wed", "thu", "fri"], start="09:00", end="17:00")
FRI_NIGHT = Schedule(days=["fri"], start="22:00", end="06:00")
SUN_NIGHT = Schedule(days=["sun"], start="20:00", end="02:30")
LATE = Schedule(days=["sat"], start="18:00", end="24:00")
TO_MIDNIGHT = Schedule(days=["sat"], start="18:00", end="00:00")  # overnight with empty tail


@pytest.mark.parametrize(
    ("schedule", "weekday", "hhmm", "expected"),
    [
        (None, "mon", "00:00", True),
        (None, "sun", "23:59", True),
        (Schedule(), "wed", "12:00", True),
        (WEEKDAYS_9_TO_5, "mon", "08:59", False),
        (WEEKDAYS_9_TO_5, "mon", "09:00", True),
        (WEEKDAYS_9_TO_5, "fri", "16:59", True),
        (WEEKDAYS_9_TO_5, "fri", "17:00", False),  # end is exclusive
        (WEEKDAYS_9_TO_5, "sat", "12:00", False),
        (FRI_NIGHT, "fri", "21:59", False),
        (FRI_NIGHT, "fri", "22:00", True),
        (FRI_NIGHT, "fri", "23:59", True),
        (FRI_NIGHT, "sat", "00:00", True),  # belongs to Friday
        (FRI_NIGHT, "sat", "05:59", True),
        (FRI_NIGHT, "sat", "06:00", False),
        (FRI_NIGHT, "sat", "22:00", False),  # Saturday is not in days
        (FRI_NIGHT, "fri", "03:00", False),  # Thursday night is not either
        (SUN_NIGHT, "sun", "20:00", True),
        (SUN_NIGHT, "mon", "02:29", True),  # wraps the week
        (SUN_NIGHT, "mon", "02:30", False),
        (SUN_NIGHT, "sun", "01:00", False),
        (LATE, "sat", "23:59", True),
        (LATE, "sat", "17:59", False),
        (LATE, "sun", "00:00", False),
        (TO_MIDNIGHT, "sat", "23:59", True),
        (TO_MIDNIGHT, "sun", "00:00", False),
        (Schedule(days=["tue"], start="00:00", end="00:01"), "tue", "00:00", True),
        (Schedule(days=["tue"], start="00:00", end="00:01"), "tue", "00:01", False),
        (Schedule(days=["tue"], start="23:59", end="24:00"), "tue", "23:59", True),
    ],
)
def test_is_open(schedule: Schedule | None, weekday: str, hhmm: str, expected: bool) -> None:
    assert CompiledSchedule(schedule).is_open(at(weekday, hhmm)) is expected


def test_seconds_do_not_matter() -> None:
    sched = CompiledSchedule(WEEKDAYS_9_TO_5)
    assert sched.is_open(at("mon", "16:59").replace(second=59, microsecond=999_999))


def test_always_flag() -> None:
    assert CompiledSchedule(None).always
    assert CompiledSchedule(Schedule()).always
    # overnight on every day still leaves 05:59-06:00 closed
    assert not CompiledSchedule(Schedule(start="06:00", end="05:59")).always
    assert not CompiledSchedule(WEEKDAYS_9_TO_5).always


def test_schedule_in_dst_gap_and_overlap() -> None:
    sched = CompiledSchedule(Schedule(days=["sun"], start="01:00", end="03:00"))
    clock = WindowClock()
    # spring forward 2026-03-08: 01:59 EST is open, next instant is 03:00 EDT, closed
    t = utc(2026, 3, 8, 6, 59).timestamp()
    assert sched.is_open(clock.get(NY, t)[1])
    assert not sched.is_open(clock.get(NY, t + 60)[1])
    # fall back 2026-11-01: both 01:30s are open (the window lasts 3 real hours)
    assert sched.is_open(clock.get(NY, utc(2026, 11, 1, 5, 30).timestamp())[1])
    assert sched.is_open(clock.get(NY, utc(2026, 11, 1, 6, 30).timestamp())[1])
    assert sched.is_open(clock.get(NY, utc(2026, 11, 1, 7, 59).timestamp())[1])
    assert not sched.is_open(clock.get(NY, utc(2026, 11, 1, 8, 0).timestamp())[1])


@pytest.mark.parametrize(
    ("schedule", "path", "reason"),
    [
        (Schedule(days=["mon", "funday"]), "schedule.days[1]", "unknown day 'funday'"),
        (Schedule(days=["Mon"]), "schedule.days[0]", "unknown day 'Mon'"),
        (Schedule(days=["monday"]), "schedule.days[0]", "unknown day"),
        (Schedule(days=[]), "schedule.days", "at least one day"),
        (Schedule(start="9:00"), "schedule.start", "HH:MM"),
        (Schedule(start="24:00"), "schedule.start", "23:59"),
        (Schedule(start="12:60"), "schedule.start", "HH:MM"),
        (Schedule(start="25:00"), "schedule.start", "HH:MM"),
        (Schedule(start="09:00:00"), "schedule.start", "HH:MM"),
        (Schedule(end="24:01"), "schedule.end", "24:00"),
        (Schedule(end="noon"), "schedule.end", "HH:MM"),
        (Schedule(end=""), "schedule.end", "HH:MM"),
        (Schedule(start="10:00", end="10:00"), "schedule.end", "empty window"),
        (Schedule(start="00:00", end="00:00"), "schedule.end", "empty window"),
    ],
)
def test_bad_schedule_raises_config_error(schedule: Schedule, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        CompiledSchedule(schedule, source="b.toml")
    assert (info.value.source, info.value.path) == ("b.toml", path)
    assert reason in info.value.reason


def test_schedule_error_path() -> None:
    with pytest.raises(ConfigError, match=r"^c\.toml: buyers\[1\]\.schedule\.start: "):
        CompiledSchedule(Schedule(start="x"), source="c.toml", path="buyers[1].schedule")


# --- caps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        (Caps(), [None] * 7),
        (Caps(day=100), [100] * 7),
        (Caps(day=100, weekday={"sat": 10, "sun": 0}), [100] * 5 + [10, 0]),
        (Caps(weekday={"mon": 5}), [5] + [None] * 6),
    ],
)
def test_daily_cap(caps: Caps, expected: list[int | None]) -> None:
    assert [daily_cap(caps, weekday) for weekday in range(7)] == expected


def test_daily_cap_follows_local_weekday() -> None:
    caps = Caps(day=100, weekday={"sat": 10})
    w = windows(utc(2026, 6, 21, 3, 0), NY)  # Sunday 03:00 UTC is Saturday 23:00 in NY
    assert daily_cap(caps, w.weekday) == 10


@pytest.mark.parametrize(
    ("caps", "path"),
    [
        (Caps(weekday={"saturday": 10}), "caps.weekday"),
        (Caps(weekday={"sat": -1}), "caps.weekday.sat"),
        (Caps(day=-1), "caps.day"),
        (Caps(total=-5), "caps.total"),
    ],
)
def test_check_caps(caps: Caps, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_caps(caps)
    assert info.value.path == path


def test_check_caps_accepts_valid_caps() -> None:
    check_caps(Caps(hour=1, day=0, week=10, month=100, total=1000, weekday={"mon": 0}))


# --- properties --------------------------------------------------------------------------

ZONES = st.sampled_from(
    [
        NY,
        TOKYO,
        KOLKATA,
        ZoneInfo("UTC"),
        ZoneInfo("Australia/Lord_Howe"),
        ZoneInfo("Pacific/Chatham"),
    ]
)
INSTANTS = st.datetimes(
    min_value=datetime.datetime(1971, 1, 1), max_value=datetime.datetime(2100, 1, 1)
).map(lambda d: d.replace(tzinfo=UTC))


@given(INSTANTS, ZONES)
def test_windows_match_a_reference(now: datetime.datetime, tz: ZoneInfo) -> None:
    w = windows(now, tz)
    local = now.astimezone(tz)
    wall = local.replace(tzinfo=None) - datetime.datetime(1970, 1, 1)
    assert w.hour == wall // datetime.timedelta(hours=1)
    assert w.day == EPOCH_DAY + w.hour // 24
    iso = local.date().isocalendar()
    assert (w.week, w.month) == (iso.year * 100 + iso.week, local.year * 100 + local.month)
    assert w.weekday == local.weekday()
    # the cached clock agrees with the direct computation at the floored second
    floored = now.replace(microsecond=0)
    assert WindowClock().get(tz, now.timestamp())[0] == windows(floored, tz)


@given(INSTANTS, ZONES)
def test_window_ids_never_decrease(now: datetime.datetime, tz: ZoneInfo) -> None:
    a, b = windows(now, tz), windows(now + datetime.timedelta(minutes=1), tz)
    # day/week/month roll forward only; DST fall-back may repeat an hour id, never rewind
    assert a.hour <= b.hour and a.day <= b.day and a.week <= b.week and a.month <= b.month


def _reference_open(days: set[int], start: int, end: int, local: datetime.datetime) -> bool:
    minute, weekday = local.hour * 60 + local.minute, local.weekday()
    if start < end:
        return weekday in days and start <= minute < end
    return (weekday in days and minute >= start) or ((weekday - 1) % 7 in days and minute < end)


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@given(
    st.sets(st.integers(0, 6), min_size=1),
    st.integers(0, 1439),
    st.integers(0, 1440),
    st.datetimes(),
)
def test_is_open_matches_reference(
    days: set[int], start: int, end: int, local: datetime.datetime
) -> None:
    assume(start != end)  # an empty window is a ConfigError, tested above
    schedule = Schedule(days=[WEEKDAYS[d] for d in days], start=_hhmm(start), end=_hhmm(end))
    assert CompiledSchedule(schedule).is_open(local) == _reference_open(days, start, end, local)
