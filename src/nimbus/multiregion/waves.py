"""Which regions a rollout reaches together, and how long it waits between.

Pure: no I/O. A *wave* is a group of regions that get the new version at
the same time (each region runs its own rollout, in parallel with the
others of its wave); waves go one after the other, with a *bake* time
between them during which the regions already on the new version are
watched before the next wave starts.

``--waves`` spells the groups: ``;`` separates waves, ``,`` the regions of
one wave (``eu;us,ap``: eu first, then us and ap together). With no
``--waves``, every region is a wave of its own, in the cluster file's order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from nimbus.errors import UserInputError

Waves = tuple[tuple[str, ...], ...]

DEFAULT_BAKE_S = 60.0
ROLLBACK_ALL, STOP = "rollback-all", "stop"
ON_REGION_FAILURE = (ROLLBACK_ALL, STOP)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def default_waves(app_regions: Sequence[str], cluster_order: Sequence[str]) -> Waves:
    """One region per wave, in the cluster file's order."""
    wanted = set(app_regions)
    return tuple((r,) for r in cluster_order if r in wanted)


def parse_waves(spec: str | Sequence[Any], app_regions: Sequence[str],
                cluster_order: Sequence[str], *, where: str = "--waves") -> Waves:
    """Waves from ``eu;us,ap`` (or a manifest's list: ``["eu", "us,ap"]`` or
    ``[[eu], [us, ap]]``). Every region of the app must be in exactly one
    wave; a region the cluster file does not name, or the app does not run
    in, is an error naming it and ``where`` the waves came from."""
    groups: list[list[str]]
    if isinstance(spec, str):
        groups = [part.split(",") for part in spec.split(";")]
    elif isinstance(spec, Sequence):
        groups = []
        for i, item in enumerate(spec):
            if isinstance(item, str):
                groups.append(item.split(","))
            elif isinstance(item, Sequence) and all(isinstance(x, str) for x in item):
                groups.append(list(item))
            else:
                raise UserInputError(f"{where}: wave {i + 1} is {item!r}; expected region "
                                     "names (a list, or a string with commas)")
    else:
        raise UserInputError(f"{where}: expected waves like 'eu;us,ap', got {spec!r}")
    waves: list[tuple[str, ...]] = []
    seen: dict[str, int] = {}
    for i, group in enumerate(groups):
        names = tuple(n.strip() for n in group if n.strip())
        if not names:
            raise UserInputError(f"{where}: wave {i + 1} names no region "
                                 "(';' separates waves, ',' the regions of one wave)")
        for name in names:
            if name not in cluster_order:
                raise UserInputError(f"{where}: region {name!r} is not in the cluster file "
                                     f"(it has {', '.join(cluster_order) or 'none'})")
            if name not in app_regions:
                raise UserInputError(f"{where}: the app does not run in region {name!r} "
                                     f"(it runs in {', '.join(app_regions)})")
            if name in seen:
                raise UserInputError(f"{where}: region {name!r} is in wave {seen[name] + 1} "
                                     f"and wave {i + 1}")
            seen[name] = i
        waves.append(names)
    missing = [r for r in app_regions if r not in seen]
    if missing:
        raise UserInputError(f"{where}: region{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)} of the app "
                             f"{'are' if len(missing) > 1 else 'is'} in no wave")
    return tuple(waves)


def parse_bake(value: str | float | int, *, where: str = "--bake") -> float:
    """Seconds from ``90``, ``30s``, ``1m``, ``1.5h``, ``500ms``."""
    if isinstance(value, bool):
        raise UserInputError(f"{where}: expected a duration like 1m or 30s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if m is None:
            raise UserInputError(f"{where}: expected a duration like 1m, 30s or 0, "
                                 f"got {value!r}")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not 0 <= seconds <= 24 * 3600:
        raise UserInputError(f"{where}: {value!r} is not between 0 and 24h")
    return seconds


def check_on_region_failure(value: Any, *, where: str = "on_region_failure") -> str:
    if value not in ON_REGION_FAILURE:
        raise UserInputError(f"{where}: expected {' or '.join(ON_REGION_FAILURE)}, "
                             f"got {value!r}")
    return str(value)


def describe_waves(waves: Waves) -> str:
    return "; ".join(", ".join(w) for w in waves)


def wait_deadline_s(step_waits: Sequence[float]) -> float:
    """How long a deploy waits for one region's rollout to end: the
    strategy's total time plus slack for the region's evaluation rounds,
    requests that come slowly, and a controller that changes leader."""
    total = float(sum(step_waits))
    return total + max(30.0, total * 0.5)
