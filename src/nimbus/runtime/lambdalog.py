"""The root logger of an instance, as AWS Lambda's Python runtime sets it up.

Lambda attaches a handler to the root logger before the function's module
is imported, so ``logging.getLogger().info(...)`` (after ``setLevel``)
reaches the logs with the invocation's request id. Two formats:

- text (the default): ``[LEVEL]\\t<UTC time, ms>Z\\t<request id>\\t<message>\\n``;
- JSON (``AWS_LAMBDA_LOG_FORMAT=JSON``, or ``log_format: JSON`` in the
  manifest): one object per record with ``timestamp``, ``level``,
  ``message``, ``logger``, ``requestId`` and, for an exception,
  ``errorType``, ``errorMessage``, ``stackTrace``; attributes given with
  ``extra=`` are keys of their own.

``AWS_LAMBDA_LOG_LEVEL`` (or ``log_level:``) sets the root logger's level
and drops records below it, as Lambda's application log level does. Each
record goes to the worker as one LOG frame carrying its level (and, in
JSON, its fields), so the platform can filter by level without parsing
text.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import orjson

# (request id, stream, text, level, fields)
SendRecord = Callable[[str | None, str, str, str, "dict[str, Any] | None"], None]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Lambda's names for its application log levels, as Python's.
LEVEL_ALIASES = {"TRACE": "DEBUG", "WARN": "WARNING", "FATAL": "CRITICAL"}
FORMATS = ("Text", "JSON")

# LogRecord attributes that are not ``extra=`` fields.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "aws_request_id", "taskName"}


def level_name(levelno: int) -> str:
    """A record's level as one of :data:`LEVELS` (custom levels round down)."""
    if levelno >= logging.CRITICAL:
        return "CRITICAL"
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARNING"
    if levelno >= logging.INFO:
        return "INFO"
    return "DEBUG"


def normalise_level(raw: str) -> str | None:
    """``raw`` as one of :data:`LEVELS` (Lambda's TRACE/WARN/FATAL accepted),
    or None when it is not a level."""
    name = raw.strip().upper()
    name = LEVEL_ALIASES.get(name, name)
    return name if name in LEVELS else None


def utc_stamp(created: float) -> str:
    """``2026-12-02T00:12:34.567Z`` for an epoch time."""
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def text_line(record: logging.LogRecord, request_id: str | None) -> str:
    """Lambda's text format of one record (its message, then any traceback)."""
    message = record.getMessage()
    if record.exc_info:
        message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.stack_info:
        message += "\n" + record.stack_info
    return (f"[{record.levelname}]\t{utc_stamp(record.created)}\t{request_id or ''}\t"
            f"{message}\n")


def json_fields(record: logging.LogRecord, request_id: str | None) -> dict[str, Any]:
    """Lambda's JSON format of one record, as a dict."""
    fields: dict[str, Any] = {
        "timestamp": utc_stamp(record.created),
        "level": level_name(record.levelno),
        "message": record.getMessage(),
        "logger": record.name,
    }
    if request_id:
        fields["requestId"] = request_id
    if record.exc_info and record.exc_info[0] is not None:
        fields["errorType"] = record.exc_info[0].__name__
        fields["errorMessage"] = str(record.exc_info[1])
        fields["stackTrace"] = traceback.format_tb(record.exc_info[2])
    if record.stack_info:
        fields["stackInfo"] = record.stack_info
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key not in fields:
            fields[key] = value
    return fields


def uncaught_fields(exc: BaseException, request_id: str) -> dict[str, Any]:
    """An exception the handler raised, in the JSON format."""
    return {"timestamp": utc_stamp(time.time()), "level": "ERROR",
            "message": f"{type(exc).__name__}: {exc}", "logger": "root",
            "requestId": request_id, "errorType": type(exc).__name__,
            "errorMessage": str(exc), "stackTrace": traceback.format_tb(exc.__traceback__)}


def json_line(fields: Mapping[str, Any]) -> str:
    return orjson.dumps(fields, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class LambdaHandler(logging.Handler):
    """Sends each record, formatted as Lambda does, with its request id."""

    def __init__(self, send: SendRecord, current_rid: Callable[[], str | None],
                 json_format: bool) -> None:
        super().__init__(logging.NOTSET)
        self._send = send
        self._rid = current_rid
        self.json_format = json_format

    def emit(self, record: logging.LogRecord) -> None:
        try:
            rid = self._rid()
            level = level_name(record.levelno)
            if self.json_format:
                fields = json_fields(record, rid)
                self._send(rid, "stdout", json_line(fields), level, fields)
            elif self.formatter is not None:  # the function's own format (basicConfig)
                self._send(rid, "stdout", self.format(record) + "\n", level, None)
            else:
                self._send(rid, "stdout", text_line(record, rid), level, None)
        except Exception:  # noqa: BLE001 - logging must never break the handler
            self.handleError(record)


def install(send: SendRecord, current_rid: Callable[[], str | None],
            env: Mapping[str, str]) -> LambdaHandler:
    """Give the root logger Lambda's handler (and only it), per ``env``."""
    json_format = env.get("AWS_LAMBDA_LOG_FORMAT", "").strip().upper() == "JSON"
    handler = LambdaHandler(send, current_rid, json_format)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.basicConfig = _basic_config(handler, logging.basicConfig)
    level = normalise_level(env.get("AWS_LAMBDA_LOG_LEVEL", ""))
    if level is not None:
        # The root logger starts at it; and, as Lambda filters by the
        # application log level, records below it never leave the handler
        # whatever level the function's code sets on its loggers.
        root.setLevel(level)
        handler.setLevel(level)
    return handler


def _basic_config(handler: LambdaHandler, original: Callable[..., None]) -> Callable[..., None]:
    """``logging.basicConfig`` that keeps the request id and level. On Lambda
    it does nothing (the root logger already has a handler), a well-known
    surprise; here its ``format``, ``datefmt``, ``style`` and ``level``
    apply to the Lambda handler (text format). Asking for a file, a stream,
    handlers of its own or ``force`` does what Python does (output to
    stderr is still captured, without a level)."""

    def basic_config(**kwargs: Any) -> None:
        root = logging.getLogger()
        own = {"filename", "stream", "handlers", "force"}
        if root.handlers != [handler] or any(kwargs.get(k) for k in own):
            original(**kwargs)
            return
        if "format" in kwargs or "datefmt" in kwargs:
            handler.setFormatter(logging.Formatter(
                kwargs.get("format"), kwargs.get("datefmt"), kwargs.get("style", "%")))
        if kwargs.get("level") is not None:
            root.setLevel(kwargs["level"])

    return basic_config
