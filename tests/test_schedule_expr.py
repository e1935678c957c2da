"""Schedule expressions: rate, AWS cron, standard cron; time zones and DST."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from nimbus.events.schedule_expr import Schedule, ScheduleError, parse_schedule


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def ticks(expression: str, start: str, n: int, zone: str = "UTC") -> list[str]:
    s = parse_schedule(expression, zone)
    t, out = at(start), []
    for _ in range(n):
        nxt = s.next_after(t)
        assert nxt is not None
        t = nxt
        out.append(t.strftime("%Y-%m-%dT%H:%M"))
    return out


@pytest.mark.parametrize("expression, start, expected", [
    ("rate(5 minutes)", "2026-03-07T00:03:10",
     ["2026-03-07T00:05", "2026-03-07T00:10", "2026-03-07T00:15"]),
    ("rate(1 hour)", "2026-03-07T00:00:00",
     ["2026-03-07T01:00", "2026-03-07T02:00", "2026-03-07T03:00"]),
    ("rate(2 days)", "2026-03-07T00:00:00",  # epoch-anchored: every controller agrees
     ["2026-03-08T00:00", "2026-03-10T00:00", "2026-03-12T00:00"]),
    ("cron(0 12 * * ? *)", "2026-03-07T12:00:00",
     ["2026-03-08T12:00", "2026-03-09T12:00", "2026-03-10T12:00"]),
    ("cron(15 10 ? * MON-FRI *)", "2026-03-06T11:00:00",  # Friday after the tick
     ["2026-03-09T10:15", "2026-03-10T10:15", "2026-03-11T10:15"]),
    ("cron(0 18 ? * 6L *)", "2026-03-01T00:00:00",  # last Friday
     ["2026-03-27T18:00", "2026-04-24T18:00", "2026-05-29T18:00"]),
    ("cron(0 9 ? * 2#1 *)", "2026-03-01T00:00:00",  # first Monday
     ["2026-03-02T09:00", "2026-04-06T09:00", "2026-05-04T09:00"]),
    ("cron(0 9 L * ? *)", "2026-01-31T10:00:00",
     ["2026-02-28T09:00", "2026-03-31T09:00", "2026-04-30T09:00"]),
    ("cron(0 9 LW * ? *)", "2026-05-01T00:00:00",  # May 31 2026 is a Sunday
     ["2026-05-29T09:00", "2026-06-30T09:00", "2026-07-31T09:00"]),
    ("cron(0 9 1W * ? *)", "2026-07-31T00:00:00",  # Aug 1 2026 is a Saturday: Monday 3rd
     ["2026-08-03T09:00", "2026-09-01T09:00", "2026-10-01T09:00"]),
    ("cron(0 0 1 JAN ? 2027-2028)", "2026-06-01T00:00:00",
     ["2027-01-01T00:00", "2028-01-01T00:00"]),
    ("*/20 9-10 * * *", "2026-03-07T00:00:00",
     ["2026-03-07T09:00", "2026-03-07T09:20", "2026-03-07T09:40", "2026-03-07T10:00"]),
    ("0 9 1 * MON", "2026-03-07T00:00:00",  # Vixie rule: the 1st or a Monday
     ["2026-03-09T09:00", "2026-03-16T09:00", "2026-03-23T09:00", "2026-03-30T09:00",
      "2026-04-01T09:00"]),
    ("0 9 */2 * MON", "2026-03-07T00:00:00",  # '*/2' is not a restriction: both apply
     ["2026-03-09T09:00", "2026-03-23T09:00", "2026-04-13T09:00"]),
    ("0 0 * * 7", "2026-03-07T00:00:00", ["2026-03-08T00:00", "2026-03-15T00:00"]),
    ("@daily", "2026-03-07T05:00:00", ["2026-03-08T00:00", "2026-03-09T00:00"]),
])
def test_next_ticks(expression: str, start: str, expected: list[str]) -> None:
    assert ticks(expression, start, len(expected)) == expected


def test_cron_runs_in_its_time_zone() -> None:
    # 09:00 in Paris is 08:00 UTC in winter, 07:00 UTC in summer
    assert ticks("0 9 * * *", "2026-03-28T12:00:00", 2, "Europe/Paris") == [
        "2026-03-29T07:00", "2026-03-30T07:00"]


def test_dst_gap_is_skipped_and_a_repeated_time_fires_once() -> None:
    ny = "America/New_York"
    # 2026-03-08 02:30 does not exist in New York
    assert ticks("30 2 * * *", "2026-03-07T00:00:00", 2, ny) == [
        "2026-03-07T07:30", "2026-03-09T06:30"]
    # 2026-11-01 01:30 happens twice: fires at the first (EDT, 05:30 UTC) only
    s = parse_schedule("30 1 * * *", ny)
    due = s.due(at("2026-10-31T12:00:00"), at("2026-11-02T12:00:00"), 10)
    assert [d.strftime("%m-%dT%H:%M") for d in due] == ["11-01T05:30", "11-02T06:30"]
    assert s.next_after(at("2026-11-01T06:00:00")) == at("2026-11-02T06:30:00")


def test_due_keeps_the_latest_and_is_cheap_for_huge_gaps() -> None:
    s = parse_schedule("* * * * *")
    due = s.due(at("2000-01-01T00:00:00"), at("2026-01-01T00:00:00"), 3)
    assert due == [at("2025-12-31T23:58:00"), at("2025-12-31T23:59:00"),
                   at("2026-01-01T00:00:00")]
    yearly = parse_schedule("0 0 1 1 *")
    assert len(yearly.due(at("2000-06-01T00:00:00"), at("2026-06-01T00:00:00"), 100)) == 26
    assert s.due(at("2026-01-01T00:00:00"), at("2026-01-01T00:00:00"), 5) == []
    # the ends: (last, now]
    assert s.due(at("2026-01-01T00:00:00"), at("2026-01-01T00:01:00"), 5) == [
        at("2026-01-01T00:01:00")]


def test_schedule_built_directly_parses() -> None:
    assert Schedule("rate(1 minute)").period_hint_s() == 60
    with pytest.raises(ScheduleError):
        Schedule("rate(1 fortnight)")


@pytest.mark.parametrize("text, phrase", [
    ("cron(0 12 * * * *)", "'?' in exactly one of day-of-month and day-of-week"),
    ("cron(0 12 ? * ? *)", "'?' in exactly one"),
    ("cron(0 24 * * ? *)", "hours: 24 is out of range 0-23"),
    ("cron(0 12 * * ?)", "drop 'cron(...)'"),
    ("cron(0 12 * * ? *", "not closed"),
    ("0 12 * * * *", "inside 'cron(...)'"),
    ("61 * * * *", "minutes: 61 is out of range 0-59"),
    ("0 0 * 13 *", "month: 13 is out of range 1-12"),
    ("0 0 * * FUNDAY", "day-of-week: 'FUNDAY' is not a value"),
    ("cron(0 12 ? * 8 *)", "day-of-week: 8 is out of range 1-7"),
    ("cron(0 12 ? * MON#6 *)", "the week must be 1-5"),
    ("5-1 * * * *", "runs backwards"),
    ("*/0 * * * *", "step"),
    ("cron(0 0 30 2 ? *)", "never fires"),
    ("rate(1 minutes)", "rate(1 minute)"),
    ("rate(5 minute)", "rate(5 minutes)"),
    ("rate(0 hours)", "1 or more"),
    ("rate(5 fortnights)", "unknown unit"),
    ("every day", "rate("),
    ("", "rate("),
])
def test_bad_expressions_say_what_is_wrong(text: str, phrase: str) -> None:
    with pytest.raises(ScheduleError) as err:
        parse_schedule(text)
    assert phrase in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_time_zone() -> None:
    with pytest.raises(ScheduleError, match="unknown time zone 'Mars/Base'"):
        parse_schedule("rate(1 hour)", "Mars/Base")
