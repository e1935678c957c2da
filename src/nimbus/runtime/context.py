"""The Lambda ``context`` object handed to every handler."""

from __future__ import annotations

import time


class LambdaContext:
    """What AWS Lambda's Python runtime passes as ``context``.

    One object per invocation; ``get_remaining_time_in_millis`` counts down to
    the invocation's deadline, a ``time.monotonic()`` instant of this process
    (the worker sends the timeout as a duration; no wall clock is involved).
    """

    __slots__ = (
        "aws_request_id",
        "function_name",
        "function_version",
        "memory_limit_in_mb",
        "invoked_function_arn",
        "log_group_name",
        "log_stream_name",
        "identity",
        "client_context",
        "traceparent",
        "trace_id",
        "_deadline",
    )

    def __init__(
        self,
        request_id: str,
        deadline: float,
        function_name: str,
        function_version: str,
        memory_mb: int,
        arn: str,
        log_group: str,
        log_stream: str,
        traceparent: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        self.aws_request_id = request_id
        self.function_name = function_name
        self.function_version = function_version
        self.memory_limit_in_mb = str(memory_mb)
        self.invoked_function_arn = arn
        self.log_group_name = log_group
        self.log_stream_name = log_stream
        self.identity = None
        self.client_context = None
        # The invocation's W3C trace context (from the event's headers) and
        # the same as Lambda's X-Ray header (``_X_AMZN_TRACE_ID``); None
        # when the invocation is not traced.
        self.traceparent = traceparent
        self.trace_id = trace_id
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def __repr__(self) -> str:
        return (
            f"LambdaContext(aws_request_id={self.aws_request_id!r}, "
            f"function_name={self.function_name!r}, "
            f"function_version={self.function_version!r})"
        )
