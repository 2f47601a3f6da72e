"""Cap windows and buyer schedules in a campaign's time zone (pure, hot path).

Window ids (:class:`Windows`) name the hour/day/week/month a lead falls in, in *local* time,
so "100 leads a day" resets at local midnight. They are plain ints, suitable as parts of
Redis keys:

* ``hour``: local hours since 1970-01-01T00:00 local: ``(day - EPOCH_DAY) * 24 + hour``.
  Wall-clock based, so across DST the ids follow the clock: on a spring-forward day one id is
  skipped, and on a fall-back day the repeated hour (01:00-01:59 twice in New York) shares
  one id, so that hour's cap covers both real hours.
* ``day``: the local date's proleptic Gregorian ordinal (``date.toordinal()``).
* ``week``: ISO year * 100 + ISO week (``202653`` for Fri 2027-01-01).
* ``month``: year * 100 + month.
* ``weekday``: 0 = Monday ... 6 = Sunday.

A :class:`CompiledSchedule` answers "does this buyer take leads now?" with one table lookup:
``days`` lists the weekdays (``mon`` ... ``sun``) and ``start``/``end`` (``HH:MM``, end may be
``24:00``) the local window ``[start, end)``. When start > end the window runs overnight and
belongs to the day it started: ``fri 22:00-06:00`` is open Friday 22:00 to Saturday 05:59.
Schedules also follow the wall clock: a spring-forward gap is simply skipped.
"""

from __future__ import annotations

import datetime
import re
from typing import NamedTuple
from zoneinfo import ZoneInfo

from engine.core.config import WEEKDAYS, Caps, Schedule
from engine.core.errors import ConfigError

__all__ = [
    "EPOCH_DAY",
    "CompiledSchedule",
    "WindowClock",
    "Windows",
    "check_caps",
    "daily_cap",
    "windows",
]

EPOCH_DAY = datetime.date(1970, 1, 1).toordinal()  # 719163
_MINUTES_PER_DAY = 24 * 60
_WEEK_MINUTES = 7 * _MINUTES_PER_DAY
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])", re.ASCII)
_DAY_INDEX = {name: index for index, name in enumerate(WEEKDAYS)}


class Windows(NamedTuple):
    """Window ids of one instant in one time zone (see the module docstring)."""

    hour: int
    day: int
    week: int
    month: int
    weekday: int


def windows(now: datetime.datetime, tz: ZoneInfo) -> Windows:
    """The window ids of the aware instant ``now`` in ``tz``."""
    if now.tzinfo is None:
        # astimezone() would silently read a naive value as the *machine's* local time
        raise ValueError("windows() needs a timezone-aware datetime")
    return _windows_of(now.astimezone(tz))


def _windows_of(local: datetime.datetime) -> Windows:
    day = local.toordinal()
    iso_year, iso_week, iso_weekday = local.isocalendar()
    return Windows(
        hour=(day - EPOCH_DAY) * 24 + local.hour,
        day=day,
        week=iso_year * 100 + iso_week,
        month=local.year * 100 + local.month,
        weekday=iso_weekday - 1,
    )


class WindowClock:
    """Per-time-zone cache of :func:`windows`: recomputed at most once per whole second.

    Ingest asks for the windows of every lead; thousands of leads per second share one
    computation. Results are those of the floored second, so they are identical whichever
    call within that second filled the cache. Not thread-safe (one per event loop).
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[ZoneInfo, tuple[int, Windows, datetime.datetime]] = {}

    def get(self, tz: ZoneInfo, now_epoch_s: float) -> tuple[Windows, datetime.datetime]:
        """Window ids and the aware local datetime of ``now_epoch_s`` (floored) in ``tz``."""
        second = int(now_epoch_s // 1)  # floor, also before 1970; the float stops here
        cached = self._cache.get(tz)
        if cached is not None and cached[0] == second:
            return cached[1], cached[2]
        local = datetime.datetime.fromtimestamp(second, tz)
        result = _windows_of(local)
        self._cache[tz] = (second, result, local)
        return result, local


class CompiledSchedule:
    """A buyer schedule as a minute-of-week table; ``None`` means always open."""

    __slots__ = ("_table", "always")

    def __init__(
        self,
        schedule: Schedule | None,
        *,
        source: str = "<config>",
        path: str = "schedule",
    ) -> None:
        self.always = schedule is None
        if schedule is None:
            self._table = b"\x01" * _WEEK_MINUTES
        else:
            self._table = _compile(schedule, source, path)
            self.always = self._table.count(1) == _WEEK_MINUTES

    def is_open(self, local: datetime.datetime) -> bool:
        """Whether the local (wall-clock) time falls in the schedule."""
        return self._table[local.weekday() * _MINUTES_PER_DAY + local.hour * 60 + local.minute] == 1


def _compile(schedule: Schedule, source: str, path: str) -> bytes:
    days = _days(schedule.days, source, f"{path}.days")
    start = _minute(schedule.start, source, f"{path}.start", allow_24=False)
    end = _minute(schedule.end, source, f"{path}.end", allow_24=True)
    if start == end:
        raise ConfigError(source, f"{path}.end", "start and end are equal: an empty window")
    table = bytearray(_WEEK_MINUTES)
    for day in days:
        base = day * _MINUTES_PER_DAY
        if start < end:
            table[base + start : base + end] = b"\x01" * (end - start)
        else:
            # overnight: the tail of this day plus the head of the next (Sun wraps to Mon)
            table[base + start : base + _MINUTES_PER_DAY] = b"\x01" * (_MINUTES_PER_DAY - start)
            head = ((day + 1) % 7) * _MINUTES_PER_DAY
            table[head : head + end] = b"\x01" * end
    return bytes(table)


def _days(names: list[str], source: str, path: str) -> set[int]:
    if not names:
        raise ConfigError(source, path, "at least one day is needed")
    days: set[int] = set()
    for i, name in enumerate(names):
        index = _DAY_INDEX.get(name)
        if index is None:
            valid = ", ".join(WEEKDAYS)
            raise ConfigError(source, f"{path}[{i}]", f"unknown day {name!r} (one of {valid})")
        days.add(index)
    return days


def _minute(text: str, source: str, path: str, *, allow_24: bool) -> int:
    if allow_24 and text == "24:00":
        return _MINUTES_PER_DAY
    match = _HHMM.fullmatch(text)
    if match is None:
        upper = "24:00" if allow_24 else "23:59"
        raise ConfigError(source, path, f"{text!r} is not a time HH:MM from 00:00 to {upper}")
    return int(match.group(1)) * 60 + int(match.group(2))


def daily_cap(caps: Caps, weekday: int) -> int | None:
    """The cap of a local day (``weekday`` 0 = Monday): ``caps.weekday[name]`` when set, else
    ``caps.day``; None means no daily cap."""
    if caps.weekday:
        return caps.weekday.get(WEEKDAYS[weekday], caps.day)
    return caps.day


def check_caps(caps: Caps, *, source: str = "<config>", path: str = "caps") -> None:
    """ConfigError for a ``weekday`` key that is not ``mon``..``sun`` or a negative cap.

    :func:`daily_cap` would silently ignore ``{saturday = 10}``; config checks call this.
    """
    for name, value in caps.weekday.items():
        if name not in _DAY_INDEX:
            valid = ", ".join(WEEKDAYS)
            raise ConfigError(source, f"{path}.weekday", f"unknown day {name!r} (one of {valid})")
        if value < 0:
            raise ConfigError(source, f"{path}.weekday.{name}", "must not be negative")
    for name in ("hour", "day", "week", "month", "total"):
        value = getattr(caps, name)
        if value is not None and value < 0:
            raise ConfigError(source, f"{path}.{name}", "must not be negative")
