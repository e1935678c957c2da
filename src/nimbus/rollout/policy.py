"""What a rollout does and when: its strategy, its rollback rule, and the
decision at each evaluation. Pure: no I/O, no clock (``now`` is a parameter).

- A :class:`Strategy` is a list of :class:`Step`: the share of traffic the
  new version gets and how long that step lasts. The last step is always
  ``Step(100, 0)``: all traffic on the new version.
- A :class:`Rule` is the ``--rollback-on`` expression: clauses
  ``METRIC OP VALUE`` joined by ``and``/``or`` (``and`` binds tighter),
  with parentheses. ``VALUE`` may be ``2x baseline``: the same metric of the
  version being replaced over the same window.
- :func:`decide` rolls back as soon as the canary has enough requests and the
  rule trips, without waiting for the step to end; it promotes only when the
  step's time is over, with enough requests and the rule holding.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from nimbus.errors import UserInputError
from nimbus.rollout.window import Window

DEFAULT_RULE = "error_rate > 2% or (p99 > 2x baseline and p99 > 100ms) or throttles > 1%"
DEFAULT_MIN_REQUESTS = 20
DEFAULT_STRATEGY = "canary:10%:5m"
# A ``x baseline`` clause needs this many baseline requests to mean anything.
BASELINE_MIN_REQUESTS = 10
MIN_STEP_S = 1.0
MAX_STEP_S = 7 * 86400.0
MAX_MIN_REQUESTS = 1_000_000

# -- durations ------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d)?", re.IGNORECASE)
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def format_duration(seconds: float) -> str:
    """``300`` -> ``5m``, ``90`` -> ``90s``, ``0.25`` -> ``250ms``, ``5400`` -> ``90m``."""
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{int(seconds // 86400)}d"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds >= 1 or seconds == 0:
        return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def format_latency(seconds: float) -> str:
    """A measured latency: ``0.0123`` -> ``12.3ms``, ``1.234`` -> ``1.23s``."""
    if seconds < 0.01:
        return f"{seconds * 1000:.2f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms" if seconds < 0.1 else f"{seconds * 1000:.0f}ms"
    return f"{seconds:.2f}s"


def format_rate(rate: float) -> str:
    return f"{rate * 100:.1f}%"


# -- strategies -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Step:
    """``share``% of traffic on the new version for ``wait_s`` seconds."""

    share: int
    wait_s: float


@dataclass(frozen=True, slots=True)
class Strategy:
    """``text`` is the canonical spelling (``canary:10%:5m``)."""

    text: str
    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return self.text


STRATEGY_FORMS = ("canary:10%:5m, linear:20%:1m or all-at-once (or a CodeDeploy name "
                  "such as Canary10Percent5Minutes, Linear10PercentEvery1Minute, AllAtOnce)")
_CODEDEPLOY = re.compile(
    r"(?:codedeploydefault\.)?(?:lambda)?(?:"
    r"canary(?P<cshare>\d+)percent(?P<cmin>\d+)minutes?"
    r"|linear(?P<lshare>\d+)percentevery(?P<lmin>\d+)minutes?"
    r"|(?P<all>allatonce))", re.IGNORECASE)
_SHARE = re.compile(r"(\d+)%?")


def parse_strategy(text: str, what: str = "--strategy") -> Strategy:
    """``canary:10%:5m`` (10% for 5 minutes, then all), ``linear:20%:1m``
    (20% more every minute), ``all-at-once``, or CodeDeploy's names."""
    if not isinstance(text, str) or not text.strip():
        raise UserInputError(f"{what}: empty strategy (expected {STRATEGY_FORMS})")
    raw = text.strip()
    parts = [p.strip() for p in raw.split(":")]
    kind = parts[0].lower()
    if kind in ("all-at-once", "allatonce", "all_at_once"):
        if len(parts) > 1:
            raise UserInputError(f"{what} {raw!r}: all-at-once takes no share or wait")
        return Strategy("all-at-once", (Step(100, 0.0),))
    if kind in ("canary", "linear"):
        if len(parts) != 3:
            raise UserInputError(
                f"{what} {raw!r}: {kind} needs a share and a wait, as in "
                f"{'canary:10%:5m' if kind == 'canary' else 'linear:20%:1m'}")
        share = _share(raw, parts[1], kind, what)
        wait = _wait(raw, parts[2], what)
        return _make(kind, share, wait)
    m = _CODEDEPLOY.fullmatch(raw)
    if m is not None:
        if m.group("all"):
            return Strategy("all-at-once", (Step(100, 0.0),))
        kind = "canary" if m.group("cshare") else "linear"
        share = _share(raw, (m.group("cshare") or m.group("lshare")) + "%", kind, what)
        wait = _wait(raw, (m.group("cmin") or m.group("lmin")) + "m", what)
        return _make(kind, share, wait)
    raise UserInputError(f"{what}: unknown strategy {parts[0]!r} in {raw!r} "
                         f"(expected {STRATEGY_FORMS})")


def _share(raw: str, part: str, kind: str, what: str) -> int:
    m = _SHARE.fullmatch(part)
    if m is None:
        raise UserInputError(f"{what} {raw!r}: share {part!r} is not a percentage "
                             f"(e.g. 10%)")
    share = int(m.group(1))
    top = 99 if kind == "canary" else 50
    if not 1 <= share <= top:
        raise UserInputError(f"{what} {raw!r}: share {part!r} must be within 1..{top}% "
                             f"for {kind}")
    return share


def _wait(raw: str, part: str, what: str) -> float:
    m = _DURATION.fullmatch(part)
    if m is None or m.group(2) is None:
        raise UserInputError(f"{what} {raw!r}: wait {part!r} is not a duration "
                             f"(e.g. 90s, 5m, 1h, 1d)")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2).lower()]
    if not MIN_STEP_S <= seconds <= MAX_STEP_S:
        raise UserInputError(f"{what} {raw!r}: wait {part!r} must be within 1s..7d "
                             f"(each step needs time to be measured)")
    return seconds


def _make(kind: str, share: int, wait: float) -> Strategy:
    text = f"{kind}:{share}%:{format_duration(wait)}"
    if kind == "canary":
        return Strategy(text, (Step(share, wait), Step(100, 0.0)))
    steps = tuple(Step(s, wait) for s in range(share, 100, share))
    return Strategy(text, (*steps, Step(100, 0.0)))


# -- the rollback rule ----------------------------------------------------------------

RATE_METRICS: dict[str, Callable[[Window], float | None]] = {
    "error_rate": lambda w: w.error_rate,
    "throttles": lambda w: w.throttle_rate,
    "timeouts": lambda w: w.timeout_rate,
    "deaths": lambda w: w.death_rate,
}
LATENCY_METRICS: dict[str, Callable[[Window], float | None]] = {
    "p50": lambda w: w.quantile(0.5),
    "p90": lambda w: w.quantile(0.9),
    "p95": lambda w: w.quantile(0.95),
    "p99": lambda w: w.quantile(0.99),
    "mean": lambda w: w.mean,
}
METRICS = (*RATE_METRICS, *LATENCY_METRICS)
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True, slots=True)
class Clause:
    """``metric op value`` (``value`` in 0..1 or seconds), or ``metric op
    times x baseline`` (``times`` set, ``value`` None)."""

    metric: str
    op: str
    value: float | None
    times: float | None
    value_text: str

    @property
    def is_rate(self) -> bool:
        return self.metric in RATE_METRICS

    def measure(self, w: Window) -> float | None:
        return (RATE_METRICS.get(self.metric) or LATENCY_METRICS[self.metric])(w)

    def check(self, canary: Window, baseline: Window) -> list[str]:
        """The reason this clause trips, or [] (also when it cannot be judged:
        no latency data, or a baseline with too few requests)."""
        got = self.measure(canary)
        if got is None:
            return []
        if self.times is None:
            assert self.value is not None
            limit = self.value
            limit_text = self.value_text
        else:
            if baseline.requests < BASELINE_MIN_REQUESTS:
                return []
            base = self.measure(baseline)
            if base is None:
                return []
            limit = self.times * base
            limit_text = f"{self.value_text} ({self._fmt(base)})"
        if not OPERATORS[self.op](got, limit):
            return []
        return [f"{self.metric} {self._fmt(got)} {self.op} {limit_text}"]

    def _fmt(self, v: float) -> str:
        return format_rate(v) if self.is_rate else format_latency(v)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value_text}"


@dataclass(frozen=True, slots=True)
class Or:
    """``a or b or ...``"""

    parts: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class And:
    """``a and b and ...``"""

    parts: tuple[Node, ...]


Node = Clause | Or | And


def _evaluate(node: Node, canary: Window, baseline: Window) -> list[str]:
    if isinstance(node, Clause):
        return node.check(canary, baseline)
    results = [_evaluate(p, canary, baseline) for p in node.parts]
    if isinstance(node, And):
        return [r for rs in results for r in rs] if all(results) else []
    return [r for rs in results for r in rs]


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed ``--rollback-on`` expression; ``text`` as written."""

    text: str
    root: Node = field(repr=False)

    def check(self, canary: Window, baseline: Window) -> list[str]:
        """Why the canary should roll back: one reason per clause that
        tripped (e.g. ``error_rate 31.0% > 2%``); [] when healthy."""
        return _evaluate(self.root, canary, baseline)

    @property
    def clauses(self) -> list[Clause]:
        out: list[Clause] = []
        stack: list[Node] = [self.root]
        while stack:
            n = stack.pop()
            if isinstance(n, Clause):
                out.append(n)
            else:
                stack.extend(reversed(n.parts))
        return out

    def __str__(self) -> str:
        return self.text


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<paren>[()])
  | (?P<op>>=|<=|>|<|==|=|!=)
  | (?P<num>(?:\d+(?:\.\d+)?|\.\d+)(?P<unit>[A-Za-z%]*))
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "(", ")", "op", "num", "word", "end"
    text: str
    col: int  # 1-based


class _Parser:
    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.what = what
        self.toks = self._tokenize()
        self.i = 0

    def fail(self, message: str) -> UserInputError:
        return UserInputError(f"{self.what}: {message}")

    def _tokenize(self) -> list[_Tok]:
        toks: list[_Tok] = []
        pos = 0
        while pos < len(self.text):
            m = _TOKEN.match(self.text, pos)
            if m is None:
                raise self.fail(f"unexpected {self.text[pos]!r} at column {pos + 1}")
            kind = m.lastgroup
            if kind == "unit":
                kind = "num"
            if kind != "space":
                text = m.group(0)
                toks.append(_Tok(text if kind == "paren" else str(kind), text, pos + 1))
            pos = m.end()
        toks.append(_Tok("end", "", len(self.text) + 1))
        return toks

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def _is_word(self, t: _Tok, *words: str) -> bool:
        return t.kind == "word" and t.text.lower() in words

    def parse(self) -> Node:
        node = self.expr()
        t = self.peek()
        if t.kind != "end":
            if t.kind == ")":
                raise self.fail(f"unmatched ')' at column {t.col}")
            raise self.fail(f"unexpected {t.text!r} at column {t.col} "
                            f"(expected 'and', 'or' or the end)")
        return node

    def expr(self) -> Node:
        parts = [self.conj()]
        while self._is_word(self.peek(), "or"):
            self.take()
            parts.append(self.conj())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def conj(self) -> Node:
        parts = [self.atom()]
        while self._is_word(self.peek(), "and"):
            self.take()
            parts.append(self.atom())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def atom(self) -> Node:
        t = self.peek()
        if t.kind == "(":
            self.take()
            node = self.expr()
            close = self.peek()
            if close.kind != ")":
                where = "the end" if close.kind == "end" else f"{close.text!r}"
                raise self.fail(f"missing ')' for the '(' at column {t.col} "
                                f"(found {where} at column {close.col})")
            self.take()
            return node
        return self.clause()

    def clause(self) -> Clause:
        t = self.take()
        if t.kind == "end":
            raise self.fail(f"expected a metric at column {t.col}, found the end "
                            f"(metrics: {', '.join(METRICS)})")
        if t.kind != "word" or self._is_word(t, "and", "or", "x", "baseline"):
            raise self.fail(f"expected a metric at column {t.col}, found {t.text!r} "
                            f"(metrics: {', '.join(METRICS)})")
        metric = t.text.lower()
        if metric not in METRICS:
            raise self.fail(f"unknown metric {t.text!r} at column {t.col} "
                            f"(metrics: {', '.join(METRICS)})")
        op = self.take()
        if op.kind != "op" or op.text not in OPERATORS:
            found = "the end" if op.kind == "end" else repr(op.text)
            raise self.fail(f"expected a comparison (>, >=, <, <=) after {metric!r} at "
                            f"column {op.col}, found {found}")
        return self.value(metric, op.text)

    def value(self, metric: str, op: str) -> Clause:
        t = self.take()
        rate = metric in RATE_METRICS
        example = "2% or 0.02" if rate else "250ms or 1.5s"
        if t.kind != "num":
            found = "the end" if t.kind == "end" else repr(t.text)
            raise self.fail(f"expected a value after '{metric} {op}' at column {t.col}, "
                            f"found {found} (e.g. {example}, or 2x baseline)")
        m = _TOKEN.match(t.text)
        assert m is not None
        unit = m.group("unit")
        number = float(t.text[:len(t.text) - len(unit)])
        unit = unit.lower()
        if unit == "" and self._is_word(self.peek(), "x"):
            self.take()
            unit = "x"
        if unit == "x":
            b = self.take()
            if not self._is_word(b, "baseline"):
                found = "the end" if b.kind == "end" else repr(b.text)
                raise self.fail(f"expected 'baseline' after {t.text!r} at column {b.col}, "
                                f"found {found}")
            if not number > 0:
                raise self.fail(f"{t.text!r} at column {t.col}: the multiple of the "
                                f"baseline must be more than 0")
            return Clause(metric, op, None, number, f"{number:g}x baseline")
        if unit not in ("", "%", "ms", "s"):
            raise self.fail(f"unknown unit {unit!r} in {t.text!r} at column {t.col} "
                            f"(units: %, ms, s, x baseline)")
        if rate:
            if unit in ("ms", "s"):
                raise self.fail(f"{metric} is a rate but {t.text!r} at column {t.col} is "
                                f"a duration (write {example}, or 2x baseline)")
            value = number / 100 if unit == "%" else number
            if value > 1:
                raise self.fail(f"{metric} is a rate within 0..1 (0..100%) but {t.text!r} "
                                f"at column {t.col} is more (write {example})")
            return Clause(metric, op, value, None, t.text)
        if unit == "%":
            raise self.fail(f"{metric} is a latency but {t.text!r} at column {t.col} is a "
                            f"percentage (write {example}, or 2x baseline)")
        if unit == "":
            raise self.fail(f"{metric} is a latency: {t.text!r} at column {t.col} needs "
                            f"a unit (write {example}, or 2x baseline)")
        return Clause(metric, op, number * _UNIT_S[unit], None, t.text)


def parse_rule(text: str, what: str = "--rollback-on") -> Rule:
    """The ``--rollback-on`` expression ``text`` (see the module's docs)."""
    if not isinstance(text, str) or not text.strip():
        raise UserInputError(f"{what}: empty rule (e.g. {DEFAULT_RULE!r})")
    return Rule(" ".join(text.split()), _Parser(text, what).parse())


def check_min_requests(n: object, what: str = "--min-requests") -> int:
    """``n`` as the minimum number of requests a step needs (1..1,000,000)."""
    if isinstance(n, str) and n.strip().isdigit():
        n = int(n.strip())
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_MIN_REQUESTS:
        raise UserInputError(f"{what}: expected a whole number within "
                             f"1..{MAX_MIN_REQUESTS:,}, got {n!r}")
    return n


# -- the decision ---------------------------------------------------------------------

Action = Literal["promote", "hold", "rollback"]


@dataclass(frozen=True, slots=True)
class Decision:
    """``action`` with a human ``reason`` and the ``figures`` behind it:
    ``canary``/``baseline`` (:meth:`Window.figures`), ``share``,
    ``elapsed_s``, ``wait_s`` and ``min_requests``."""

    action: Action
    reason: str
    figures: dict[str, Any]


def decide(*, step: Step, step_started: float, now: float, canary: Window,
           baseline: Window, rule: Rule, min_requests: int) -> Decision:
    """Promote, hold or roll back the step ``step`` that began at
    ``step_started``, from what the new version (``canary``) and the version
    being replaced (``baseline``) did since then.

    - roll back as soon as the canary has ``min_requests`` and the rule trips
      (a bad version is not left serving until the step ends);
    - promote when the step's wait is over, the canary has ``min_requests``
      and the rule holds;
    - hold otherwise: the reason says what it waits for.
    The last step (share 100) promotes at once: nothing is left to compare."""
    elapsed = max(0.0, now - step_started)
    left = step.wait_s - elapsed
    n = canary.requests
    figures: dict[str, Any] = {
        "share": step.share, "elapsed_s": round(elapsed, 3), "wait_s": step.wait_s,
        "min_requests": min_requests, "canary": canary.figures(),
        "baseline": baseline.figures()}
    if step.share >= 100:
        return Decision("promote", "last step: all traffic on the new version", figures)
    if n >= min_requests:
        reasons = rule.check(canary, baseline)
        if reasons:
            return Decision("rollback", f"{' and '.join(reasons)} over {n} requests",
                            figures)
    if n < min_requests:
        tail = (f"; {_left(left)} left in the step" if left > 0
                else "; the step's time is over, it passes once enough requests came")
        return Decision("hold", f"too few requests: {n} of {min_requests} requests{tail}",
                        figures)
    if left > 0:
        return Decision("hold", f"healthy so far over {n} requests; {_left(left)} left in "
                        f"the step", figures)
    return Decision("promote", f"healthy for {format_duration(step.wait_s)} over {n} "
                    f"requests ({summary(canary)})", figures)


def _left(seconds: float) -> str:
    return format_duration(float(math.ceil(seconds)))


def summary(w: Window) -> str:
    """``error_rate 0.2%, p99 120ms`` (the latency only when there is some)."""
    text = f"error_rate {format_rate(w.error_rate)}"
    if w.throttled:
        text += f", throttles {format_rate(w.throttle_rate)}"
    p99 = w.quantile(0.99)
    if p99 is not None:
        text += f", p99 {format_latency(p99)}"
    return text
