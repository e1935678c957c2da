"""Every exception nimbus raises, sorted by whose fault it is.

    NimbusError
    ├── ClosedError            we closed the resource and then used it
    ├── UnavailableError       a peer or backend failed (``__cause__`` is set)
    │   └── InstanceDiedError  an instance process exited mid-invocation      -> 502
    ├── ConflictError          a revision moved under a compare-and-set
    ├── NotFoundError          a key, function or version does not exist
    ├── UserInputError         the user's input is wrong
    │   ├── ManifestError      file, line, field, what was expected
    │   └── DeployError        requirements install / handler import failed
    └── InvocationError        one invocation failed; the gateway maps these
        ├── RouteNotFoundError                                            -> 404
        ├── MethodNotAllowedError                                         -> 405
        ├── PayloadTooLargeError                                          -> 413
        ├── ThrottledError                                                -> 429
        ├── HandlerError       the user's handler raised                  -> 500
        └── InvocationTimeoutError  the handler ran past timeout_s        -> 504

The gateway turns these into HTTP statuses in one table
(:data:`nimbus.gateway.responses.STATUS_BY_ERROR`); nothing returns an
error as a field of a result.
"""

from __future__ import annotations

from pathlib import Path


class NimbusError(Exception):
    """Root of every nimbus exception."""


class ClosedError(NimbusError):
    """The resource was closed by us and then used."""


class UnavailableError(NimbusError):
    """A peer or backend failed; ``__cause__`` holds the driver error."""


class InstanceDiedError(UnavailableError):
    """The instance process exited while it held an invocation."""


class ConflictError(NimbusError):
    """A compare-and-set lost: the key's revision moved (or it exists)."""


class NotFoundError(NimbusError):
    """A key, function or version does not exist."""


class UserInputError(NimbusError):
    """The user's input is wrong; the message says what and where."""


class ManifestError(UserInputError):
    """A manifest is wrong. Renders as ``file:line: field: message``."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self.render())

    def relative_to(self, folder: str | Path) -> ManifestError:
        """The same error with ``folder`` (where the app was unpacked) left
        out of its file name and message: what the user sent is the app."""
        root = str(folder).rstrip("/")
        file = self.file
        if file is not None and file.startswith(root + "/"):
            file = file[len(root) + 1:]
        message = self.message.replace(root + "/", "").replace(root, "the app folder")
        return ManifestError(message, file=file, line=self.line, field=self.field)

    def render(self) -> str:
        where = self.file or "<manifest>"
        if self.line is not None:
            where += f":{self.line}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class DeployError(UserInputError):
    """A deploy could not complete (requirements install, handler import)."""


class InvocationError(NimbusError):
    """One invocation failed; subclasses map to HTTP statuses."""


class RouteNotFoundError(InvocationError):
    pass


class MethodNotAllowedError(InvocationError):
    def __init__(self, message: str, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed


class PayloadTooLargeError(InvocationError):
    pass


class ThrottledError(InvocationError):
    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class HandlerError(InvocationError):
    """The handler raised. ``error`` is the Lambda-shaped error body."""

    def __init__(self, error: dict[str, object]) -> None:
        super().__init__(str(error.get("errorMessage", "")))
        self.error = error


class InvocationTimeoutError(InvocationError):
    pass
