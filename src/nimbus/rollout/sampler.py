"""Where a rollout's per-version counters come from.

- :class:`LocalSampler`: a ``nimbus up`` counts every invocation itself; its
  counters are read in-process, one process id ``"local"``.
- :class:`ScrapeSampler`: a region's workers run the invocations and its
  gateways count what they refused or lost, each in its own process. The
  rollout reads what they already serve: each live worker's and gateway's
  ``/metrics`` (the URL in its node record), scraped in parallel with the
  region token, each with a deadline. A process that does not answer in
  time is left out of that sample (counted in :attr:`ScrapeSampler.missing`);
  :func:`nimbus.rollout.window.delta` then counts it right when it answers
  again, restarted or not.

Both answer :data:`nimbus.rollout.window.Counters`: (function, version) ->
process id -> cumulative :class:`Window`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from nimbus.cluster.nodes import live_nodes
from nimbus.observe import metrics
from nimbus.observe.metrics import DURATION_BUCKETS, OUTCOMES
from nimbus.rollout.window import N_BUCKETS, Counters, Window

log = logging.getLogger("nimbus.rollout")

SCRAPE_TIMEOUT_S = 2.0
MAX_SCRAPE_BYTES = 8 * 1024 * 1024
SCRAPED_ROLES = ("worker", "gateway")
LOCAL = "local"


class Sampler(Protocol):
    async def sample(self, functions: set[str]) -> Counters:
        """The cumulative counters of every version of ``functions``."""
        ...


def window_of(stats: metrics.InvocationStats) -> Window:
    return Window(stats.success, stats.error, stats.timeout, stats.throttled,
                  stats.instance_died, tuple(stats.buckets), stats.total_s)


class LocalSampler:
    """This process's own counters (``nimbus up``)."""

    async def sample(self, functions: set[str]) -> Counters:
        return {(s.function, s.version): {LOCAL: window_of(s)}
                for s in metrics.all_invocation_stats() if s.function in functions}


# -- reading exposition text --------------------------------------------------------

_BOUND_INDEX = {b: i for i, b in enumerate(DURATION_BUCKETS)}


def windows_from_text(text: str, functions: set[str]) -> dict[tuple[str, int], Window]:
    """The windows of ``functions``' versions in one process's ``/metrics``
    text (``nimbus_invocations_total`` and the duration histogram's
    ``_bucket`` and ``_sum``); ``ValueError`` if it is not exposition text."""
    counts: dict[tuple[str, int], dict[str, int]] = {}
    cumulative: dict[tuple[str, int], dict[int, int]] = {}
    sums: dict[tuple[str, int], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("nimbus_invocations", "nimbus_invocation_duration_seconds"):
            continue
        for s in family.samples:
            key = _key(s.labels, functions)
            if key is None:
                continue
            if s.name == "nimbus_invocations_total":
                outcome = s.labels.get("outcome", "")
                if outcome in OUTCOMES:
                    counts.setdefault(key, {})[outcome] = int(s.value)
            elif s.name == "nimbus_invocation_duration_seconds_bucket":
                i = _bucket_index(s.labels.get("le", ""))
                if i is not None:
                    cumulative.setdefault(key, {})[i] = int(s.value)
            elif s.name == "nimbus_invocation_duration_seconds_sum":
                sums[key] = float(s.value)
    out: dict[tuple[str, int], Window] = {}
    for key in counts.keys() | cumulative.keys():
        out[key] = Window.from_dict({**counts.get(key, {}),
                                     "buckets": _per_bucket(cumulative.get(key, {})),
                                     "total_s": sums.get(key, 0.0)})
    return out


_FAMILY_LINES = ("nimbus_invocation", "# HELP nimbus_invocation", "# TYPE nimbus_invocation")


def invocation_lines(text: str) -> str:
    """The lines of ``text`` that belong to the invocation families."""
    return "".join(ln + "\n" for ln in text.splitlines() if ln.startswith(_FAMILY_LINES))


def _key(labels: dict[str, str], functions: set[str]) -> tuple[str, int] | None:
    fn = labels.get("function")
    if fn not in functions:
        return None
    try:
        return fn, int(labels.get("version", ""))
    except ValueError:
        return None


def _bucket_index(le: str) -> int | None:
    try:
        bound = float(le)
    except ValueError:
        return None
    if math.isinf(bound):
        return N_BUCKETS - 1
    return _BOUND_INDEX.get(bound)  # a bound nimbus does not use: left out


def _per_bucket(cumulative: dict[int, int]) -> tuple[int, ...]:
    out = [0] * N_BUCKETS
    below = 0
    for i in range(N_BUCKETS):
        if i in cumulative:
            out[i] = max(0, cumulative[i] - below)
            below = max(below, cumulative[i])
    return tuple(out)


# -- scraping a region --------------------------------------------------------------

# process id -> base URL of its metrics endpoint (``/metrics`` is appended)
Targets = Callable[[], Awaitable[dict[str, str]]]


def region_targets(store: Any, roles: Iterable[str] = SCRAPED_ROLES) -> Targets:
    """Every live worker's and gateway's ``metrics`` URL, by node id."""
    async def targets() -> dict[str, str]:
        out: dict[str, str] = {}
        for role in roles:
            for node_id, info in (await live_nodes(store, role)).items():
                url = info.get("metrics")
                if isinstance(url, str) and url:
                    out[node_id if node_id not in out else f"{role}/{node_id}"] = url
        return out
    return targets


class ScrapeSampler:
    """A region's counters, scraped from its processes' ``/metrics``.

    ``targets`` finds the processes (default: the live workers and gateways
    of ``store``); after each :meth:`sample`, :attr:`missing` is how many did
    not answer (in time, with 200 and exposition text) and :attr:`errors`
    says why, by process id."""

    def __init__(self, store: Any, token: str, *, targets: Targets | None = None,
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        if targets is None and store is None:
            raise ValueError("ScrapeSampler needs a store or a targets callable")
        self.targets = targets if targets is not None else region_targets(store)
        self.timeout_s = timeout_s
        self.headers = {"authorization": f"Bearer {token}"}
        self.missing = 0
        self.errors: dict[str, str] = {}
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers)
        return self._client

    async def _scrape(self, url: str) -> str:
        client = self._http()
        r = await asyncio.wait_for(client.get(url.rstrip("/") + "/metrics"), self.timeout_s)
        if r.status_code != 200:
            raise ValueError(f"answered {r.status_code}")
        if len(r.content) > MAX_SCRAPE_BYTES:
            raise ValueError(f"answered {len(r.content)} bytes, over {MAX_SCRAPE_BYTES}")
        return r.text

    async def _one(self, pid: str, url: str, functions: set[str],
                   ) -> dict[tuple[str, int], Window] | None:
        try:
            text = await self._scrape(url)
            # only the two families read, parsed off the event loop (a worker's
            # whole exposition can be megabytes; this runs every tick)
            return await asyncio.to_thread(windows_from_text, invocation_lines(text),
                                           functions)
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            self.errors[pid] = f"{url}: {type(exc).__name__}: {exc}"[:300]
            return None

    async def sample(self, functions: set[str]) -> Counters:
        targets = await self.targets()
        pids = sorted(targets)
        self.errors = {}
        got = await asyncio.gather(*(self._one(p, targets[p], functions) for p in pids))
        out: Counters = {}
        for pid, windows in zip(pids, got, strict=True):
            if windows is None:
                continue
            for key, w in windows.items():
                out.setdefault(key, {})[pid] = w
        self.missing = len(self.errors)
        if self.errors:
            log.info("rollout sample: %d of %d processes did not answer: %s",
                     self.missing, len(pids), "; ".join(self.errors.values()))
        return out

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
