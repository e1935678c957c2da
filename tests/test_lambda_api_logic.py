"""The Invoke API's pure parts: FunctionName and Qualifier, the tail's
text, the stack trace from the logged traceback, and the errors as
Lambda names them."""

from __future__ import annotations

import base64

import orjson
import pytest

from nimbus.control.lambda_api import (
    TAIL_BYTES,
    AwsError,
    function_error,
    parse_function,
    platform_error,
    stack_trace,
    tail_result,
)
from nimbus.errors import (
    HandlerError,
    InstanceDiedError,
    InvocationTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    ThrottledError,
    UnavailableError,
)
from nimbus.observe.logs import recent_records


@pytest.mark.parametrize("raw, qualifier, want", [
    ("echo", None, ("echo", None)),
    ("echo", "$LATEST", ("echo", None)),
    ("echo", "7", ("echo", "7")),
    ("echo:beta", None, ("echo", "beta")),
    ("echo:beta", "beta", ("echo", "beta")),
    ("echo:$LATEST", None, ("echo", None)),
    ("arn:aws:lambda:eu-west-1:123456789012:function:echo", None, ("echo", None)),
    ("arn:aws:lambda:local:000000000000:function:echo:3", None, ("echo", "3")),
    ("arn:aws:lambda:us-east-1:000000000000:function:echo", "live", ("echo", "live")),
    ("123456789012:function:echo:beta", None, ("echo", "beta")),
])
def test_function_names_qualifiers_and_arns(raw, qualifier, want):
    assert parse_function(raw, qualifier) == want


@pytest.mark.parametrize("raw, qualifier, says", [
    ("", None, "FunctionName"),
    ("echo:beta", "1", "does not match"),
    ("echo:a:b", None, "FunctionName"),
    ("arn:aws:s3:::bucket", None, "FunctionName"),
    ("arn:aws:lambda:us-east-1:000000000000:layer:x", None, "FunctionName"),
    ("ec/ho", None, "FunctionName"),
    ("echo", "a b", "Qualifier"),
    ("x" * 300, None, "FunctionName"),
])
def test_malformed_names_are_400_naming_what(raw, qualifier, says):
    with pytest.raises(AwsError) as err:
        parse_function(raw, qualifier)
    assert err.value.status == 400 and err.value.error_type == "InvalidParameterValueException"
    assert says in str(err.value)


def test_the_tail_is_lambdas_lines_cut_to_the_last_4_kb():
    recs = [{"text": "hello"}, {"text": "world"}]
    text = base64.b64decode(tail_result(recs, "r1", 3, 1.25, 128)).decode()
    assert text.splitlines() == [
        "START RequestId: r1 Version: 3", "hello", "world", "END RequestId: r1",
        "REPORT RequestId: r1\tDuration: 1.25 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\t"]
    many = [{"text": f"line {i} é"} for i in range(2000)]
    data = base64.b64decode(tail_result(many, "r2", 1, 0.2, None))
    assert len(data) <= TAIL_BYTES and data.endswith(b"Billed Duration: 1 ms\t\n")
    data.decode()  # never cut inside a character
    assert b"START" not in data


def test_the_stack_trace_comes_from_the_logged_traceback():
    lines = ["[ERROR] ValueError: kaboom", "Traceback (most recent call last):",
             '  File "/x/nimbus/runtime/bootstrap.py", line 176, in _invoke_one',
             "    result = handler(event, ctx)",
             '  File "/app/handlers.py", line 9, in boom',
             '    raise ValueError("kaboom")', "ValueError: kaboom"]
    recs = [{"stream": "stdout", "text": "  File not a frame"}]
    recs += [{"stream": "stderr", "level": "ERROR", "text": t} for t in lines]
    assert stack_trace(recs) == [
        '  File "/app/handlers.py", line 9, in boom\n    raise ValueError("kaboom")\n']
    json_rec = {"stream": "stderr", "level": "ERROR", "text": "{}",
                "fields": {"stackTrace": ["  File \"a.py\", line 1, in f\n"]}}
    assert stack_trace([json_rec]) == ['  File "a.py", line 1, in f\n']
    assert stack_trace([]) == []


def test_failures_of_the_function_are_unhandled_errors_and_the_rest_are_aws_errors():
    assert function_error(HandlerError({"errorType": "E", "errorMessage": "m"})) == {
        "errorType": "E", "errorMessage": "m"}
    assert function_error(InvocationTimeoutError("timed out after 1 s"))["errorType"] == \
        "Sandbox.Timedout"
    assert function_error(InstanceDiedError("gone"))["errorType"] == "Runtime.ExitError"
    assert function_error(NotFoundError("x")) is None
    cases = [(NotFoundError("no"), 404, "ResourceNotFoundException"),
             (PayloadTooLargeError("big"), 413, "RequestTooLargeException"),
             (ThrottledError("busy", retry_after_s=2), 429, "TooManyRequestsException"),
             (UnavailableError("down"), 503, "ServiceException")]
    for exc, status, kind in cases:
        err = platform_error(exc)
        assert (err.status, err.error_type) == (status, kind)
    assert platform_error(ThrottledError("busy", retry_after_s=2)).headers == {
        "retry-after": "2"}


def test_recent_records_stop_at_the_first_older_record(tmp_path):
    path = tmp_path / "fn.log"
    recs = [{"ts": 100.0 + i, "rid": "a" if i % 2 else "b", "stream": "stdout",
             "text": f"line {i}"} for i in range(10)]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs) + b'{"ts": 1')
    assert [r["text"] for r in recent_records(path, 105.0)] == [
        "line 5", "line 6", "line 7", "line 8", "line 9"]  # the torn last line is left
    assert [r["text"] for r in recent_records(path, 105.0, request_id="a")] == [
        "line 5", "line 7", "line 9"]
    # at most max_bytes are read back: here the last two lines
    assert [r["text"] for r in recent_records(path, 0, request_id="b", max_bytes=200)] == [
        "line 8"]
    assert recent_records(tmp_path / "none.log", 0) == []
