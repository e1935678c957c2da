"""``--parameter-overrides``: a SAM template's parameter values, as ``sam deploy`` takes them.

One option, several values: ``--parameter-overrides Stage=prod Size=2``,
also quoted as one (``'Stage=prod Size=2'``, shell-style quotes inside:
``'Tick="rate(5 minutes)"'``), comma-separated
(``Stage=prod,Size=2``) or in CloudFormation's long form
(``ParameterKey=Stage,ParameterValue=prod``). A comma-separated piece
without ``=`` continues the value before it, so a CommaDelimitedList reads
as written (``Zones=a,b,c``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import Any

import click

_KEY = re.compile(r"[A-Za-z0-9]+")
_LONG = re.compile(r"ParameterKey=([^,]*),ParameterValue=(.*)")


def parse_overrides(values: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``values`` as given on the command line -> {name: value}; ``click.BadParameter``
    naming the piece that is wrong."""
    out: dict[str, str] = {}
    tokens: list[str] = []
    for value in values:
        try:
            words = shlex.split(value)
        except ValueError:  # an unbalanced quote: the words as they are
            words = value.split()
        for word in words:
            if tokens and "=" not in word:  # Key=rate(1 minute) given as one argument
                tokens[-1] += " " + word
            else:
                tokens.append(word)
    for token in tokens:
        long = _LONG.fullmatch(token)
        pairs: list[list[str]] = []
        if long is not None:
            pairs.append([long.group(1), long.group(2)])
        else:
            for piece in token.split(","):
                if "=" in piece:
                    key, _, value = piece.partition("=")
                    pairs.append([key, value])
                elif pairs:
                    pairs[-1][1] += "," + piece
                else:
                    raise click.BadParameter(f"expected KEY=VALUE, got {token!r}",
                                             param_hint="--parameter-overrides")
        for key, value in pairs:
            if not _KEY.fullmatch(key):
                raise click.BadParameter(f"{key!r} is not a parameter name (letters and "
                                         "digits)", param_hint="--parameter-overrides")
            out[key] = value
    return out


class _Greedy(click.Option):
    """An option that also takes the ``KEY=VALUE`` words after its first value."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for opt in self.opts:
            inner = parser._long_opt.get(opt) or parser._short_opt.get(opt)
            if inner is None:
                continue
            previous = inner.process

            def process(value: Any, state: Any, previous: Any = previous) -> None:
                previous(value, state)
                while state.rargs and "=" in state.rargs[0] and \
                        not state.rargs[0].startswith("-"):
                    previous(state.rargs.pop(0), state)
            inner.process = process


def parameter_overrides_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--parameter-overrides", "parameter_overrides", cls=_Greedy, multiple=True,
        metavar="KEY=VALUE ...",
        help="Values of a SAM template's Parameters, as sam deploy takes them "
             "(Stage=prod Size=2).")(f)
