"""When to try an async invocation again: a pure decision, ``now`` given.

Exponential backoff with jitter: the n-th retry waits
``retry_delay_s x 2**(n-1)``, scaled by a factor in [0.5, 1) drawn from
``rand`` (so retries of a burst of failures spread out instead of
returning together), capped at ``MAX_DELAY_S``. There is no retry when the
tries are used up or when the retry would start after the event's maximum
age.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DELAY_S = 900.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int  # tries after the first
    retry_delay_s: float  # before the first retry
    max_event_age_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    delay_s: float | None  # None: give up
    reason: str  # why we give up ("" when retrying)


def next_retry(policy: RetryPolicy, *, attempts: int, enqueued_at: float, now: float,
               rand: float) -> Verdict:
    """After the ``attempts``-th try failed: wait ``delay_s``, or give up.

    ``rand`` is uniform in [0, 1)."""
    if attempts > policy.retries:
        tries = "try" if attempts == 1 else "tries"
        return Verdict(None, f"failed after {attempts} {tries} (retries: {policy.retries})")
    base = policy.retry_delay_s * (2 ** (attempts - 1))
    delay = min(MAX_DELAY_S, base * (0.5 + rand / 2))
    if now + delay - enqueued_at > policy.max_event_age_s:
        return Verdict(None, f"the next try would be past the maximum event age "
                             f"({policy.max_event_age_s:g} s)")
    return Verdict(delay, "")


def too_old(policy: RetryPolicy, *, enqueued_at: float, now: float) -> bool:
    """An event older than its maximum age is not run at all (as Lambda)."""
    return now - enqueued_at > policy.max_event_age_s
