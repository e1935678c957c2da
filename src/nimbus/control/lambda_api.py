"""The Lambda Invoke API on the control port, for boto3 and the AWS CLI.

``POST /2015-03-31/functions/{FunctionName}/invocations`` as AWS Lambda
answers it, so ``boto3.client("lambda", endpoint_url=...).invoke(...)``
works unchanged:

- the function: a name, ``name:qualifier`` or a function ARN
  (``arn:aws:lambda:REGION:ACCOUNT:function:name[:qualifier]``, any region
  and account), and ``?Qualifier=`` (a version number, an alias, or
  ``$LATEST``: what ``live`` runs);
- ``X-Amz-Invocation-Type``: ``RequestResponse`` (200, the handler's result
  as JSON; a handler error is a 200 with ``X-Amz-Function-Error:
  Unhandled`` and Lambda's error body), ``Event`` (202: stored as a durable
  async invocation by the events service, pinned to the qualifier) or
  ``DryRun`` (204 once the function and qualifier exist);
- ``X-Amz-Log-Type: Tail``: ``X-Amz-Log-Result`` is the base64 of the last
  4 KB of this invocation's log (its START, END and REPORT lines around
  what the handler printed);
- ``X-Amz-Executed-Version``: the version that ran; ``x-amzn-RequestId``:
  the request id (the invocation id of an ``Event``).

Requests are signed with AWS Signature Version 4 (:mod:`nimbus.control.sigv4`)
by the key pair derived from the control token (``nimbus aws-credentials``
prints it), not with the bearer token. Errors are AWS's:
``{"Type", "message"}`` with the ``x-amzn-ErrorType`` header boto3 reads
its exception class from.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from nimbus.aio import cancel_and_wait
from nimbus.control import sigv4
from nimbus.control.openapi import NAME_PATTERN
from nimbus.errors import (
    DeployError,
    HandlerError,
    InstanceDiedError,
    InvocationTimeoutError,
    NimbusError,
    NotFoundError,
    PayloadTooLargeError,
    ThrottledError,
    UserInputError,
)
from nimbus.gateway.app import invocation_type
from nimbus.gateway.split import Split
from nimbus.ids import new_id
from nimbus.observe.logs import recent_records
from nimbus.observe.protocols import FileLogSource, LogSource, Record

if TYPE_CHECKING:
    from nimbus.control.server import Platform

log = logging.getLogger("nimbus.control")

PATH = "/2015-03-31/functions/{function}/invocations"
MAX_SYNC_BYTES = 6 * 1024 * 1024  # Lambda's synchronous payload limit
TAIL_BYTES = 4096
# the longest a Tail waits for lines after the result: past the region log
# stream's 1-s read when a wake-up was missed
TAIL_WAIT_S = 1.5
TAIL_QUIET_S = 0.3  # ... and for the next batch once some came
CLOCK_SLACK_S = 1.0  # records written this much before the invocation began are read too
MAX_FUNCTION_CHARS = 256
_NAME = re.compile(NAME_PATTERN)
_QUALIFIER = re.compile(r"\$LATEST|[A-Za-z0-9_-]{1,128}")
_PARTIAL_ARN = re.compile(r"\d{12}:function:(.+)")
LATEST = "$LATEST"


class AwsError(Exception):
    """An error answered in AWS's shape."""

    def __init__(self, status: int, error_type: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers = headers or {}


def aws_error(status: int, error_type: str, message: str, request_id: str,
              headers: dict[str, str] | None = None) -> Response:
    body = {"Type": "User" if status < 500 else "Service", "message": message}
    if error_type == "TooManyRequestsException":
        body["Reason"] = "ReservedFunctionConcurrentInvocationLimitExceeded"
    return Response(orjson.dumps(body), status, media_type="application/json", headers={
        "x-amzn-errortype": error_type, "x-amzn-requestid": request_id, **(headers or {})})


def parse_function(raw: str, qualifier: str | None) -> tuple[str, str | None]:
    """The function name and qualifier (None: ``live``) from the path's
    FunctionName and the ``Qualifier`` parameter; AwsError if either is
    malformed or they name different qualifiers."""
    bad = AwsError(400, "InvalidParameterValueException",
                   "FunctionName must be a function name, NAME:QUALIFIER or a function ARN "
                   f"(arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]), got {raw[:200]!r}")
    if not raw or len(raw) > MAX_FUNCTION_CHARS:
        raise bad
    rest = raw
    if raw.startswith("arn:"):
        parts = raw.split(":", 6)
        if len(parts) != 7 or parts[2] != "lambda" or parts[5] != "function":
            raise bad
        rest = parts[6]
    elif m := _PARTIAL_ARN.fullmatch(raw):
        rest = m.group(1)
    name, sep, inline = rest.partition(":")
    if not _NAME.fullmatch(name) or (sep and not _QUALIFIER.fullmatch(inline)):
        raise bad
    if qualifier is not None and not _QUALIFIER.fullmatch(qualifier):
        raise AwsError(400, "InvalidParameterValueException",
                       "Qualifier must be a version number, an alias name or $LATEST, got "
                       f"{qualifier[:200]!r}")
    if sep and qualifier is not None and qualifier != inline:
        raise AwsError(400, "InvalidParameterValueException",
                       f"The derived qualifier from the function name ({inline}) does not "
                       f"match the specified qualifier ({qualifier}).")
    chosen = inline if sep else qualifier
    return name, None if chosen in (None, LATEST) else chosen


def tail_result(records: list[Record], rid: str, version: Any, duration_ms: float,
                memory_mb: Any) -> str:
    """``X-Amz-Log-Result``: the base64 of the last ``TAIL_BYTES`` of this
    invocation's log as Lambda writes it (START, the lines, END, REPORT)."""
    lines = [f"START RequestId: {rid} Version: {version}"]
    lines += [str(r.get("text", "")) for r in records]
    lines.append(f"END RequestId: {rid}")
    report = (f"REPORT RequestId: {rid}\tDuration: {duration_ms:.2f} ms\t"
              f"Billed Duration: {max(1, int(-(-duration_ms // 1)))} ms")
    if memory_mb is not None:
        report += f"\tMemory Size: {memory_mb} MB"
    lines.append(report + "\t")
    data = ("\n".join(lines) + "\n").encode()[-TAIL_BYTES:]
    start = 0  # never begin inside a UTF-8 character
    while start < len(data) and start < 4 and data[start] & 0xC0 == 0x80:
        start += 1
    return base64.b64encode(data[start:]).decode()


def stack_trace(records: list[Record]) -> list[str]:
    """Lambda's ``stackTrace`` (one string per frame, the function's own
    frames) from the uncaught exception the runtime logged at level ERROR:
    a JSON-format record's ``fields``, or a text traceback's frames."""
    frames: list[str] = []
    inside = False
    for rec in records:
        if rec.get("level") != "ERROR" or rec.get("stream") != "stderr":
            continue
        fields = rec.get("fields")
        if isinstance(fields, dict) and isinstance(fields.get("stackTrace"), list):
            return [str(f) for f in fields["stackTrace"]]
        text = str(rec.get("text", ""))
        if text.startswith("Traceback (most recent call last):"):
            inside, frames = True, []  # a chained exception: the last one was raised
        elif inside and text.startswith("  File "):
            frames.append(text + "\n")
        elif inside and text.startswith("    ") and frames:
            frames[-1] += text + "\n"
        else:
            inside = False
    return [f for f in frames if _RUNTIME_FRAME not in f]


_RUNTIME_FRAME = "/nimbus/runtime/bootstrap.py\""


class InvocationLines:
    """One invocation's log records, read once it has answered.

    ``nimbus up``'s files cost nothing before the invocation: afterwards the
    sink is flushed and the file read backwards from its end down to the
    first record older than the invocation (every line the handler printed
    was written before its result arrived: they share the instance's
    socket). Other sources (a region's stream) are followed from before the
    invocation (:meth:`open`) until they go quiet, within ``TAIL_WAIT_S`` of
    the result."""

    def __init__(self, source: LogSource, function: str, rid: str) -> None:
        self.source = source
        self.function = function
        self.rid = rid
        self.started = time.time()
        self._got: asyncio.Queue[list[Record]] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if isinstance(self.source, FileLogSource):
            return
        batches = await self.source.read(self.function, tail=0, request_id=self.rid,
                                         follow=True)

        async def pump() -> None:  # following from now: its wake-ups are on already
            try:
                async for batch in batches:
                    self._got.put_nowait(batch)
            except Exception as exc:  # noqa: BLE001 - a tail without lines, not a failed call
                log.debug("following the log of %s for its tail: %r", self.rid, exc)
            finally:
                await batches.aclose()

        self._pump = asyncio.create_task(pump(), name=f"tail {self.rid}")

    async def collect(self) -> list[Record]:
        source = self.source
        if isinstance(source, FileLogSource):
            source.sink.flush()
            return await asyncio.to_thread(
                recent_records, source.sink.path(self.function), self.started - CLOCK_SLACK_S,
                request_id=self.rid)
        try:
            return await self._followed()
        finally:
            await self.close()

    async def _followed(self) -> list[Record]:
        out: list[Record] = []
        deadline = time.monotonic() + TAIL_WAIT_S
        while (left := deadline - time.monotonic()) > 0 and self._pump is not None:
            try:
                out += await asyncio.wait_for(self._got.get(),
                                              min(left, TAIL_QUIET_S) if out else left)
            except TimeoutError:
                break
        return out

    async def close(self) -> None:
        if self._pump is not None:
            pump, self._pump = self._pump, None
            await cancel_and_wait(pump)


def function_error(exc: NimbusError) -> dict[str, Any] | None:
    """Lambda's error body for a failure of the function itself (answered
    as 200 with ``X-Amz-Function-Error: Unhandled``), or None when the
    failure is not the function's."""
    if isinstance(exc, HandlerError):
        return dict(exc.error)
    if isinstance(exc, InvocationTimeoutError):
        return {"errorType": "Sandbox.Timedout", "errorMessage": str(exc)}
    if isinstance(exc, InstanceDiedError):
        return {"errorType": "Runtime.ExitError", "errorMessage": str(exc)}
    if isinstance(exc, DeployError):
        error = getattr(exc, "error", None)
        return dict(error) if isinstance(error, dict) else {
            "errorType": "Runtime.ImportModuleError", "errorMessage": str(exc)}
    return None


def platform_error(exc: NimbusError) -> AwsError:
    """A failure that is not the function's, as Lambda names it."""
    if isinstance(exc, NotFoundError):
        return AwsError(404, "ResourceNotFoundException", f"Function not found: {exc}")
    if isinstance(exc, PayloadTooLargeError):
        return AwsError(413, "RequestTooLargeException", str(exc))
    if isinstance(exc, ThrottledError):
        return AwsError(429, "TooManyRequestsException", f"Rate Exceeded. {exc}",
                        {"retry-after": str(exc.retry_after_s)})
    if isinstance(exc, UserInputError):
        return AwsError(400, "InvalidParameterValueException", str(exc))
    return AwsError(503, "ServiceException", f"{type(exc).__name__}: {exc}")


def routes(platform: Platform, log_source: LogSource) -> list[Route]:
    """The Invoke API's route for ``platform``, its lines read from ``log_source``."""
    access_key_id, secret = sigv4.credentials_for(platform.token)

    def secrets(kid: str) -> str | None:
        return secret if kid == access_key_id else None

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_SYNC_BYTES:
            raise AwsError(413, "RequestTooLargeException",
                           f"Request must be smaller than {MAX_SYNC_BYTES} bytes for the "
                           "Invoke operation", {"connection": "close"})
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_SYNC_BYTES:
                raise AwsError(413, "RequestTooLargeException",
                               f"Request must be smaller than {MAX_SYNC_BYTES} bytes for the "
                               "Invoke operation", {"connection": "close"})
            chunks.append(chunk)
        return b"".join(chunks)

    def signed(request: Request) -> sigv4.Signed:
        """The signature's form, date and key, checked before the body is read."""
        scope = request.scope
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in request.headers.raw]
        return sigv4.precheck(request.method, path.partition("?")[0],
                              scope.get("query_string", b"").decode("latin-1"), headers,
                              secrets=secrets, now=time.time())

    async def invoke(request: Request) -> Response:
        rid = new_id()
        try:
            try:
                pending = signed(request)
                body = await read_body(request)
                pending.finish(body)
            except sigv4.SignatureError as exc:
                raise AwsError(403, exc.error_type, str(exc)) from None
            return await run(request, body, rid)
        except AwsError as exc:
            return aws_error(exc.status, exc.error_type, str(exc), rid, exc.headers)
        except NimbusError as exc:
            err = platform_error(exc)
            return aws_error(err.status, err.error_type, str(err), rid, err.headers)
        except ClientDisconnect:
            return aws_error(400, "InvalidRequestContentException",
                             "the client left mid-request", rid)
        except Exception:  # a bug of ours: logged, answered in AWS's shape
            log.exception("Invoke API %s failed", request.url.path)
            return aws_error(500, "ServiceException", "internal error (see the nimbus log)",
                             rid)

    async def run(request: Request, body: bytes, rid: str) -> Response:
        raw_name: str = request.path_params["function"]
        name, qualifier = parse_function(raw_name, request.query_params.get("Qualifier"))
        try:
            kind = invocation_type(request.headers.get("x-amz-invocation-type"))
        except UserInputError as exc:
            raise AwsError(400, "InvalidParameterValueException", str(exc)) from None
        tail_type = request.headers.get("x-amz-log-type", "None")
        if tail_type not in ("None", "Tail"):
            raise AwsError(400, "InvalidParameterValueException",
                           f"X-Amz-Log-Type must be None or Tail, got {tail_type[:40]!r}")
        invoker = platform.routes.invoker_for(name, qualifier)  # 404 when unknown
        if kind == "DryRun":
            return Response(status_code=204, headers={"x-amzn-requestid": rid})
        try:
            event = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise AwsError(400, "InvalidRequestContentException",
                           f"Could not parse request body into json: {exc}") from None
        if kind == "Event":
            sent = await platform.events.submit(name, body if body.strip() else b"{}",
                                                qualifier=qualifier)
            return Response(status_code=202, headers={"x-amzn-requestid": sent.id})
        if isinstance(invoker, Split):  # the version that runs it, chosen now
            invoker = invoker.pick(None)
        return await call(invoker, name, rid, event, tail=tail_type == "Tail")

    async def call(invoker: Any, name: str, rid: str, event: Any, *, tail: bool) -> Response:
        target = invoker.target
        # This invocation's lines: for Tail, and for a handler error's stack
        # trace (the runtime logs it; the error body leaves it out). A file
        # is read after the answer only; a region's stream is followed, and
        # only for Tail.
        lines = InvocationLines(log_source, name, rid)
        following = tail and not isinstance(log_source, FileLogSource)
        if following:
            await lines.open()
        headers = {"x-amzn-requestid": rid, "x-amz-executed-version": str(target.version)}
        error: dict[str, Any] | None = None
        started = time.perf_counter()
        try:
            result = await invoker.invoke(rid, event)
        except NimbusError as exc:
            error = function_error(exc)
            if error is None:
                await lines.close()
                raise
        except BaseException:
            await lines.close()
            raise
        duration_ms = (time.perf_counter() - started) * 1000
        records: list[Record] = []
        if tail or (error is not None and "stackTrace" not in error
                    and isinstance(log_source, FileLogSource)):
            records = await lines.collect()
        if error is not None:
            error.setdefault("requestId", rid)
            if "stackTrace" not in error:
                error["stackTrace"] = stack_trace(records)
            headers["x-amz-function-error"] = "Unhandled"
            body = orjson.dumps(error)
        else:
            body = orjson.dumps(result)
        if tail:
            spec = getattr(target, "spec", None)
            headers["x-amz-log-result"] = tail_result(
                records, rid, target.version, duration_ms, getattr(spec, "memory_mb", None))
        return Response(body, 200, media_type="application/json", headers=headers)

    async def no_such_function(request: Request) -> Response:
        """A name with a ``/`` in it (or any other path under the API):
        no function has such a name, answered in AWS's shape."""
        rest = request.path_params["rest"]
        return aws_error(404, "ResourceNotFoundException",
                         f"Function not found: {rest[:200]!r} (a function name has no '/')",
                         new_id())

    return [Route(PATH, invoke, methods=["POST"]),
            Route("/2015-03-31/functions/{rest:path}", no_such_function,
                  methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]

