"""Schedule expressions: when a schedule's ticks fall.

Three forms, as EventBridge and cron users write them:

* ``rate(5 minutes)``: AWS rate; the unit is singular for 1 and plural
  otherwise (``minute``, ``hour``, ``day``; ``second`` is a nimbus
  extension). Ticks fall on multiples of the period since the Unix epoch,
  so every controller agrees on them without sharing a start time.
* ``cron(0 12 * * ? *)``: AWS cron, six fields (minutes hours day-of-month
  month day-of-week year), day-of-week 1-7 = SUN-SAT, exactly one of
  day-of-month and day-of-week is ``?``; ``L``, ``W``, ``LW`` and ``#``.
* ``0 12 * * *``: standard 5-field cron, day-of-week 0-7 (0 and 7 are
  Sunday); when both day fields are restricted a day matching either fires
  (the Vixie rule). ``@hourly``, ``@daily`` and friends too.

Cron is evaluated at minute resolution in the schedule's IANA time zone: a
wall-clock time skipped by a DST change does not fire, one repeated by it
fires once (its first occurrence). Everything here is pure: ``now`` comes in
as a parameter.
"""

from __future__ import annotations

import calendar
import functools
import math
import re
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

MAX_YEAR = 2199  # AWS's upper bound; also bounds the search for a next tick

_RATE = re.compile(r"rate\(\s*(\S+)\s+([A-Za-z]+)\s*\)", re.IGNORECASE)
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_MONTHS = {n.upper(): i for i, n in enumerate(calendar.month_abbr) if n}
_DAYS_STD = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}
_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
           "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
           "@hourly": "0 * * * *"}
_HELP = ("expected 'rate(N minutes|hours|days)', 'cron(minutes hours day-of-month month "
         "day-of-week year)' or a 5-field cron like '0 12 * * *'")


class ScheduleError(ValueError):
    """An expression nimbus cannot schedule; the message names what is wrong."""


def parse_schedule(text: str, timezone: str = "UTC") -> Schedule:
    if not isinstance(text, str) or not isinstance(timezone, str):
        raise ScheduleError(f"{_HELP}, got {text!r}")
    return _parse(text, timezone)


@functools.lru_cache(maxsize=512)
def _parse(text: str, timezone: str) -> Schedule:
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {timezone!r}; expected an IANA name "
                            "like 'Europe/Paris'") from None
    s = text.strip()
    if s.lower().startswith("rate("):
        rule: _Rule = _parse_rate(s)
    elif s.lower().startswith("cron("):
        if not s.endswith(")"):
            raise ScheduleError(f"'cron(' is not closed in {s!r}")
        rule = _parse_cron(s[5:-1].split(), aws=True, text=s)
    elif s.lower() in _MACROS:
        rule = _parse_cron(_MACROS[s.lower()].split(), aws=False, text=s)
    elif len(s.split()) in (5, 6):
        rule = _parse_cron(s.split(), aws=False, text=s)
    else:
        raise ScheduleError(f"{_HELP}, got {s!r}")
    sched = Schedule(s, timezone, _rule=rule, _zone=zone)
    if sched.next_after(datetime(1970, 1, 1, tzinfo=UTC)) is None:
        raise ScheduleError(f"{s!r} never fires")
    return sched


@dataclass(frozen=True)
class Schedule:
    expression: str
    timezone: str = "UTC"
    _rule: _Rule | None = field(default=None, repr=False, compare=False)
    _zone: zoneinfo.ZoneInfo | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._rule is None:  # built directly: parse now
            parsed = parse_schedule(self.expression, self.timezone)
            object.__setattr__(self, "_rule", parsed._rule)
            object.__setattr__(self, "_zone", parsed._zone)

    def next_after(self, t: datetime) -> datetime | None:
        """The first tick strictly after ``t`` (aware), in UTC; None if none
        before the year 2200."""
        assert self._rule is not None and self._zone is not None
        return self._rule.next_after(t.astimezone(UTC), self._zone)

    def due(self, last: datetime, now: datetime, limit: int) -> list[datetime]:
        """Ticks in (``last``, ``now``], earliest first; of many, the latest
        ``limit``. Cheap however long the gap: it searches back from ``now``
        in a window that doubles until it holds ``limit`` ticks or reaches
        ``last``."""
        if now <= last or limit <= 0:
            return []
        window = timedelta(seconds=self.period_hint_s() * limit)
        while True:
            start = max(last, now - window)
            ticks = self._between(start, now)
            if len(ticks) >= limit or start == last:
                return ticks[-limit:]
            window *= 2

    def _between(self, start: datetime, end: datetime) -> list[datetime]:
        out: list[datetime] = []
        t = self.next_after(start)
        while t is not None and t <= end:
            out.append(t)
            t = self.next_after(t)
        return out

    def period_hint_s(self) -> float:
        """The rate's period, or 60 s for cron: no two cron ticks are closer."""
        assert self._rule is not None
        return self._rule.period_s


class _Rule:
    period_s: float

    def next_after(self, t: datetime, zone: zoneinfo.ZoneInfo) -> datetime | None:
        raise NotImplementedError


# -- rate ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rate(_Rule):
    period_s: float

    def next_after(self, t: datetime, zone: zoneinfo.ZoneInfo) -> datetime | None:
        k = math.floor(t.timestamp() / self.period_s) + 1
        nxt = datetime.fromtimestamp(k * self.period_s, UTC)
        return nxt if nxt.year <= MAX_YEAR else None


def _parse_rate(s: str) -> _Rate:
    m = _RATE.fullmatch(s)
    if not m:
        raise ScheduleError(f"expected 'rate(N unit)' like 'rate(5 minutes)', got {s!r}")
    raw, unit = m.group(1), m.group(2).lower()
    if not raw.isdigit() or int(raw) < 1:
        raise ScheduleError(f"rate: the value must be a whole number of 1 or more, got {raw!r}")
    n = int(raw)
    base = unit.removesuffix("s")
    if base not in _UNITS:
        raise ScheduleError(f"rate: unknown unit {m.group(2)!r}; expected minutes, hours "
                            "or days (or seconds)")
    want = base if n == 1 else base + "s"
    if unit != want:
        raise ScheduleError(f"rate: write 'rate({n} {want})' (singular for 1, plural "
                            f"otherwise), got {s!r}")
    return _Rate(float(n * _UNITS[base]))


# -- cron ------------------------------------------------------------------------

@dataclass(frozen=True)
class _DayOfMonth:
    days: frozenset[int] = frozenset()
    last: bool = False  # L
    last_weekday: bool = False  # LW
    near_weekday: frozenset[int] = frozenset()  # nW

    def matches(self, d: date) -> bool:
        mlen = calendar.monthrange(d.year, d.month)[1]
        if d.day in self.days or (self.last and d.day == mlen):
            return True
        if self.last_weekday and d == _weekday_near(d.replace(day=mlen)):
            return True
        return any(n <= mlen and d == _weekday_near(d.replace(day=n))
                   for n in self.near_weekday)


def _weekday_near(d: date) -> date:
    """The weekday nearest ``d`` in its month (the ``W`` rule)."""
    wd = d.weekday()  # Mon=0 .. Sun=6
    if wd < 5:
        return d
    mlen = calendar.monthrange(d.year, d.month)[1]
    if wd == 5:  # Saturday: Friday, or Monday if that leaves the month
        return d - timedelta(days=1) if d.day > 1 else d + timedelta(days=2)
    return d + timedelta(days=1) if d.day < mlen else d - timedelta(days=2)


@dataclass(frozen=True)
class _DayOfWeek:
    days: frozenset[int] = frozenset()  # 0 = Sunday
    last_of: frozenset[int] = frozenset()  # nL: the month's last such day
    nth: frozenset[tuple[int, int]] = frozenset()  # d#n

    def matches(self, d: date) -> bool:
        wd = (d.weekday() + 1) % 7
        if wd in self.days:
            return True
        mlen = calendar.monthrange(d.year, d.month)[1]
        if wd in self.last_of and d.day + 7 > mlen:
            return True
        return (wd, (d.day - 1) // 7 + 1) in self.nth


@dataclass(frozen=True)
class _Cron(_Rule):
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    months: frozenset[int]
    years: frozenset[int] | None
    dom: _DayOfMonth | None  # None: any day
    dow: _DayOfWeek | None
    either: bool = False  # standard cron, both day fields restricted: either fires
    period_s: float = 60.0

    def day_matches(self, d: date) -> bool:
        dom = self.dom is None or self.dom.matches(d)
        dow = self.dow is None or self.dow.matches(d)
        return (dom or dow) if self.either else (dom and dow)

    def next_after(self, t: datetime, zone: zoneinfo.ZoneInfo) -> datetime | None:
        local = t.astimezone(zone).replace(tzinfo=None, second=0, microsecond=0)
        start = local + timedelta(minutes=1)
        day = start.date()
        first_day = True
        while day.year <= MAX_YEAR:
            if self.years is not None and day.year not in self.years:
                later = [y for y in self.years if y > day.year]
                if not later:
                    return None
                day, first_day = date(min(later), 1, 1), False
                continue
            if day.month not in self.months:
                day, first_day = _next_month(day), False
                continue
            if self.day_matches(day):
                hit = self._in_day(day, start if first_day else None, t, zone)
                if hit is not None:
                    return hit
            day, first_day = day + timedelta(days=1), False
        return None

    def _in_day(self, day: date, start: datetime | None, after: datetime,
                zone: zoneinfo.ZoneInfo) -> datetime | None:
        floor = (start.hour, start.minute) if start is not None else (0, 0)
        for h in self.hours:
            if h < floor[0]:
                continue
            for m in self.minutes:
                if (h, m) < floor:
                    continue
                wall = datetime(day.year, day.month, day.day, h, m)
                aware = wall.replace(tzinfo=zone)  # fold=0: the first of a repeated time
                utc = aware.astimezone(UTC)
                if utc.astimezone(zone).replace(tzinfo=None) != wall:
                    continue  # skipped by a DST change
                if utc > after:
                    return utc
        return None


def _next_month(d: date) -> date:
    return date(d.year + 1, 1, 1) if d.month == 12 else date(d.year, d.month + 1, 1)


_FIELDS_AWS = ("minutes", "hours", "day-of-month", "month", "day-of-week", "year")
_FIELDS_STD = ("minutes", "hours", "day-of-month", "month", "day-of-week")


def _parse_cron(parts: list[str], *, aws: bool, text: str) -> _Cron:
    names = _FIELDS_AWS if aws else _FIELDS_STD
    if len(parts) != len(names):
        hint = ""
        if aws and len(parts) == 5:
            hint = ("; AWS cron has six fields (the last is the year): add ' *', or drop "
                    "'cron(...)' to write standard 5-field cron")
        elif not aws and len(parts) == 6:
            hint = "; six fields are AWS cron: write them inside 'cron(...)'"
        raise ScheduleError(f"expected {len(names)} fields ({' '.join(names)}), got "
                            f"{len(parts)} in {text!r}{hint}")
    minute, hour, dom, month, dow = parts[:5]
    if aws and (dom == "?") == (dow == "?"):
        raise ScheduleError(
            "AWS cron needs '?' in exactly one of day-of-month and day-of-week "
            f"(got {dom!r} and {dow!r}), e.g. 'cron(0 12 * * ? *)'")
    years = None
    if aws and parts[5] != "*":
        years = frozenset(_numbers(parts[5], "year", 1970, MAX_YEAR))
    dow_lo, dow_hi = (1, 7) if aws else (0, 7)
    return _Cron(
        minutes=tuple(sorted(_numbers(minute, "minutes", 0, 59))),
        hours=tuple(sorted(_numbers(hour, "hours", 0, 23))),
        months=frozenset(_numbers(month, "month", 1, 12, _MONTHS)),
        years=years,
        dom=None if dom in ("*", "?") else _parse_dom(dom, aws),
        dow=None if dow in ("*", "?") else _parse_dow(dow, aws, dow_lo, dow_hi),
        # Vixie cron: a day field starting with '*' does not count as restricted
        either=not aws and not dom.startswith(("*", "?")) and not dow.startswith(("*", "?")),
    )


def _numbers(part: str, name: str, lo: int, hi: int,
             names: dict[str, int] | None = None) -> set[int]:
    out: set[int] = set()
    for item in part.split(","):
        out |= _item(item, name, lo, hi, names)
    return out


def _item(item: str, name: str, lo: int, hi: int, names: dict[str, int] | None) -> set[int]:
    body, _, step_s = item.partition("/")
    step = 1
    if _:
        if not step_s.isdigit() or int(step_s) < 1:
            raise ScheduleError(f"{name}: the step in {item!r} must be a whole number of 1 "
                                "or more")
        step = int(step_s)
    if body == "*":
        a, b = lo, hi
    elif "-" in body:
        a_s, b_s = body.split("-", 1)
        a, b = _value(a_s, name, lo, hi, names), _value(b_s, name, lo, hi, names)
        if a > b:
            raise ScheduleError(f"{name}: the range {body!r} runs backwards")
    else:
        a = _value(body, name, lo, hi, names)
        b = hi if _ else a
    return set(range(a, b + 1, step))


def _value(s: str, name: str, lo: int, hi: int, names: dict[str, int] | None) -> int:
    if names is not None and s.upper() in names:
        return names[s.upper()]
    if not s.isdigit():
        valid = f"{lo}-{hi}" + (" or a name like " + next(iter(names)) if names else "")
        raise ScheduleError(f"{name}: {s!r} is not a value ({valid})")
    v = int(s)
    if not lo <= v <= hi:
        raise ScheduleError(f"{name}: {v} is out of range {lo}-{hi}")
    return v


def _parse_dom(part: str, aws: bool) -> _DayOfMonth:
    days: set[int] = set()
    last = last_weekday = False
    near: set[int] = set()
    for item in part.split(","):
        up = item.upper()
        if aws and up == "L":
            last = True
        elif aws and up == "LW":
            last_weekday = True
        elif aws and up.endswith("W") and up[:-1].isdigit():
            near.add(_value(up[:-1], "day-of-month", 1, 31, None))
        else:
            days |= _item(item, "day-of-month", 1, 31, None)
    return _DayOfMonth(frozenset(days), last, last_weekday, frozenset(near))


def _parse_dow(part: str, aws: bool, lo: int, hi: int) -> _DayOfWeek:
    # names map to the field's own numbering, then everything to 0 = Sunday
    names = {k: v + lo if aws else v for k, v in _DAYS_STD.items()}
    def shift(v: int) -> int:
        return v - 1 if aws else v % 7

    days: set[int] = set()
    last_of: set[int] = set()
    nth: set[tuple[int, int]] = set()
    for item in part.split(","):
        up = item.upper()
        if aws and up == "L":
            days.add(6)  # Saturday, the last day of the week
        elif aws and up.endswith("L"):
            last_of.add(shift(_value(up[:-1], "day-of-week", lo, hi, names)))
        elif aws and "#" in up:
            d_s, n_s = up.split("#", 1)
            if not n_s.isdigit() or not 1 <= int(n_s) <= 5:
                raise ScheduleError(f"day-of-week: in {item!r} the week must be 1-5")
            nth.add((shift(_value(d_s, "day-of-week", lo, hi, names)), int(n_s)))
        else:
            days |= {shift(v) for v in _item(item, "day-of-week", lo, hi, names)}
    return _DayOfWeek(frozenset(days), frozenset(last_of), frozenset(nth))
