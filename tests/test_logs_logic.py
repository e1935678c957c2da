"""The pure parts of function logs: time spans, levels, filters, Lambda's
line formats, throttle counting, platform line texts."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import click
import orjson
import pytest

from nimbus.cli.logs import log_params, render
from nimbus.events.dispatch import give_up_line, retry_line
from nimbus.observe.logfilter import LogFilter, level_of, parse_level, parse_since
from nimbus.observe.logs import record_extra
from nimbus.observe.platformlog import ThrottleNotes, throttle_line
from nimbus.runtime import lambdalog
from nimbus.worker.instance import init_error_summary

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("raw", "back_s"), [
    ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400),
    ("1.5h", 5400), ("500ms", 0.5), (" 2w ", 1_209_600)])
def test_since_spans_count_back_from_now(raw: str, back_s: float) -> None:
    assert parse_since(raw, NOW) == NOW - back_s


def test_since_iso_times_are_utc_unless_they_say_otherwise() -> None:
    eight = datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert parse_since("2027-01-15T08:00:00Z", NOW) == eight
    assert parse_since("2027-01-15T08:00:00", NOW) == eight
    assert parse_since("2027-01-15T09:00:00+01:00", NOW) == eight
    assert parse_since("1970-01-01T00:01:00Z", NOW) == 60.0


@pytest.mark.parametrize("raw", ["", "yesterday", "10", "10x", "m10", "-5m", "2000d",
                                 "2026-13-01T00:00:00Z"])
def test_bad_since_says_what_is_accepted(raw: str) -> None:
    with pytest.raises(ValueError, match="must be a span|more than a year"):
        parse_since(raw, NOW)


def test_levels_take_any_case_and_lambdas_names() -> None:
    assert [parse_level(x) for x in ("debug", "Info", "WARN", "warning", "error",
                                     "FATAL", "TRACE")] == [
        "DEBUG", "INFO", "WARNING", "WARNING", "ERROR", "CRITICAL", "DEBUG"]
    with pytest.raises(ValueError, match="must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        parse_level("LOUD")


def test_the_filter_counts_unlevelled_lines_as_info() -> None:
    recs = [{"ts": NOW - 10, "rid": "a", "stream": "stdout", "text": "print"},
            {"ts": NOW - 5, "rid": "a", "stream": "stdout", "text": "w", "level": "WARNING"},
            {"ts": NOW, "rid": "b", "stream": "platform", "text": "p", "level": "ERROR"},
            {"ts": NOW, "rid": "b", "stream": "stdout", "text": "d", "level": "DEBUG"}]
    assert level_of(recs[0]) == "INFO"
    assert [r["text"] for r in LogFilter(level="INFO").apply(recs)] == ["print", "w", "p"]
    assert [r["text"] for r in LogFilter(level="WARNING").apply(recs)] == ["w", "p"]
    assert [r["text"] for r in LogFilter(level="DEBUG").apply(recs)] == ["print", "w", "p", "d"]
    assert [r["text"] for r in LogFilter(since=NOW - 5).apply(recs)] == ["w", "p", "d"]
    assert [r["text"] for r in LogFilter(since=NOW - 6, level="ERROR",
                                         request_id="b").apply(recs)] == ["p"]
    assert LogFilter().empty and LogFilter().apply(recs) == recs
    assert not LogFilter(since=NOW).matches({"text": "no time"})


def _record(level: int, msg: str, *args: Any, exc: bool = False,
            **extra: Any) -> logging.LogRecord:
    info = sys.exc_info() if exc else None
    rec = logging.LogRecord("orders", level, "/code/h.py", 3, msg, args, info)
    rec.created = 1_796_170_220.8091  # 2026-12-02T00:10:20.809Z
    rec.__dict__.update(extra)
    return rec


def test_lambdas_text_line() -> None:
    rec = _record(logging.INFO, "order %s", 7)
    assert lambdalog.text_line(rec, "rid-1") == (
        "[INFO]\t2026-12-02T00:10:20.809Z\trid-1\torder 7\n")
    assert lambdalog.text_line(rec, None) == "[INFO]\t2026-12-02T00:10:20.809Z\t\torder 7\n"
    try:
        raise KeyError("k")
    except KeyError:
        rec = _record(logging.ERROR, "failed", exc=True)
    lines = lambdalog.text_line(rec, "r").split("\n")
    assert lines[0] == "[ERROR]\t2026-12-02T00:10:20.809Z\tr\tfailed"
    assert lines[1] == "Traceback (most recent call last):" and lines[-2] == "KeyError: 'k'"


def test_lambdas_json_fields() -> None:
    rec = _record(logging.WARNING, "low stock %d", 2, sku="x1", obj=object)
    fields = lambdalog.json_fields(rec, "rid-2")
    assert {k: v for k, v in fields.items() if k != "obj"} == {
        "timestamp": "2026-12-02T00:10:20.809Z", "level": "WARNING", "message": "low stock 2",
        "logger": "orders", "requestId": "rid-2", "sku": "x1"}
    assert orjson.loads(lambdalog.json_line(fields))["obj"] == str(object)  # anything goes
    try:
        raise ValueError("bad")
    except ValueError:
        rec = _record(logging.ERROR, "failed", exc=True)
    fields = lambdalog.json_fields(rec, None)
    assert "requestId" not in fields
    assert (fields["errorType"], fields["errorMessage"]) == ("ValueError", "bad")
    assert len(fields["stackTrace"]) == 1 and 'raise ValueError("bad")' in fields["stackTrace"][0]


def test_the_handler_sends_level_and_fields_and_honours_the_level() -> None:
    sent: list[tuple[Any, ...]] = []
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.basicConfig)
    try:
        lambdalog.install(lambda *a: sent.append(a), lambda: "r1",
                          {"AWS_LAMBDA_LOG_FORMAT": "json", "AWS_LAMBDA_LOG_LEVEL": "warn"})
        assert root.handlers[0].__class__ is lambdalog.LambdaHandler and len(root.handlers) == 1
        root.setLevel(logging.DEBUG)  # the function's own setting: the handler still filters
        logging.getLogger("a").info("dropped")
        logging.getLogger("a").log(35, "custom level")
        assert len(sent) == 1
        rid, stream, text, level, fields = sent[0]
        assert (rid, stream, level, fields["level"], fields["message"]) == (
            "r1", "stdout", "WARNING", "WARNING", "custom level")
        assert orjson.loads(text) == fields
    finally:
        logging.basicConfig = saved[2]
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_basic_config_formats_through_the_lambda_handler() -> None:
    sent: list[tuple[Any, ...]] = []
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.basicConfig)
    try:
        lambdalog.install(lambda *a: sent.append(a), lambda: "r2", {})
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        logging.getLogger("m").info("hello %s", "you")
        assert sent == [("r2", "stdout", "INFO hello you\n", "INFO", None)]
    finally:
        logging.basicConfig = saved[2]
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_platform_lines_default_to_error_and_print_lines_have_no_level() -> None:
    assert record_extra("platform", None, None) == {"level": "ERROR"}
    assert record_extra("platform", "WARNING", None) == {"level": "WARNING"}
    assert record_extra("stdout", None, None) == {}
    assert record_extra("stdout", "INFO", {"a": 1}) == {"level": "INFO", "fields": {"a": 1}}
    long = "x" * (64 * 1024 + 1)  # cut into pieces: each keeps the level, none the fields
    assert record_extra("stdout", "INFO", {"m": long}, long) == {"level": "INFO"}


def test_throttles_make_one_line_per_window_with_counts() -> None:
    assert throttle_line({"at the limit": 1}, 1.0) == (
        "throttled 1 request in the last 1 s (1 at the limit)")
    assert throttle_line({"a": 3, "b": 2}, 1.0) == (
        "throttled 5 requests in the last 1 s (3 a; 2 b)")
    lines: list[tuple[Any, ...]] = []

    async def burst() -> None:
        notes = ThrottleNotes(lambda *a: lines.append(a), window_s=3600)
        for _ in range(1000):
            notes.hit("at the limit")
        notes.hit("held")
        assert lines == []  # nothing written on the hot path: one timer armed
        notes.close()
        notes.close()  # nothing more to say

    asyncio.run(burst())
    assert lines == [(None, "platform", "throttled 1001 requests in the last 3600 s "
                      "(1000 at the limit; 1 held)", "WARNING")]


def test_async_and_import_lines() -> None:
    err = {"errorType": "RuntimeError", "errorMessage": "no"}
    assert retry_line("i1", 1, 0.25, err) == (
        "async invocation i1 failed on try 1 (RuntimeError: no); retrying in 0.2 s")
    assert give_up_line("i1", 1, True, err) == (
        "async invocation i1 dead-lettered after 1 try (RuntimeError: no)")
    assert give_up_line("i1", 3, False, {**err, "nimbusReason": "too old"}) == (
        "async invocation i1 failed for good (dead_letter: false) after 3 tries "
        "(RuntimeError: no); too old")
    assert init_error_summary({"function": "g2", "file": "lib/g2.py", "line": 3,
                               "errorType": "ModuleNotFoundError",
                               "errorMessage": "No module named 'slugify'"}) == (
        "function g2: lib/g2.py, line 3: handler failed to import: ModuleNotFoundError: "
        "No module named 'slugify'")
    assert init_error_summary({"errorType": "E", "errorMessage": "m"}) == (
        "handler failed to import: E: m")


def test_cli_checks_since_and_level_and_labels_regions() -> None:
    params = log_params(follow=True, request_id="r", tail=5, since="10m", level="warn",
                        now=NOW)
    assert params == {"follow": "1", "request_id": "r", "tail": "5", "since": "10m",
                      "level": "WARNING"}
    with pytest.raises(click.BadParameter, match="must be a span"):
        log_params(follow=False, request_id=None, tail=None, since="soon", level=None, now=NOW)
    with pytest.raises(click.BadParameter, match="must be one of"):
        log_params(follow=False, request_id=None, tail=None, since=None, level="x", now=NOW)
    rec = {"ts": 1_796_170_220.809, "rid": None, "stream": "platform", "text": "t",
           "level": "ERROR"}
    assert render(rec, False, "eu") == "[eu] 2026-12-02T00:10:20.809Z - platform:ERROR t"
    assert orjson.loads(render(rec, True, "eu")) == {"region": "eu", **rec}
