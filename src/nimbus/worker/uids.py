"""A stable uid (and gid) per function, from a configured range.

Like Android's app ids: the first time a function is started it gets the
lowest free id of the range, recorded in a root-only file, and keeps it
across restarts and redeploys. The range's first id is kept for building
requirements venvs (never a function's). Ids are never reused while the
file lists them, so files a function left behind never pass to another.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import orjson

from nimbus.errors import UnavailableError


class UidTable:
    def __init__(self, path: Path, first: int, last: int) -> None:
        if not 1000 <= first < last <= 2**31 - 2:
            raise ValueError(f"uid range must be FIRST-LAST with 1000 <= FIRST < LAST, "
                             f"was: {first}-{last}")
        self.path = path
        self.first = first
        self.last = last
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        if path.exists():
            data = orjson.loads(path.read_bytes())
            self._ids = {str(k): int(v) for k, v in data.items()}

    @property
    def builder(self) -> int:
        """The id that builds requirements venvs."""
        return self.first

    def get(self, function: str) -> int:
        with self._lock:
            uid = self._ids.get(function)
            if uid is not None:
                return uid
            taken = set(self._ids.values())
            uid = next((u for u in range(self.first + 1, self.last + 1) if u not in taken), None)
            if uid is None:
                raise UnavailableError(f"no free uid left in {self.first}-{self.last} "
                                       "(nimbus up --uid-range)")
            self._ids[function] = uid
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(self._ids))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return uid
