"""The manifest's ``rollout:`` block: app keys, function keys over them, and
every bad key refused with its file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nimbus.errors import ManifestError
from nimbus.manifest.loader import load_app
from nimbus.manifest.model import RolloutSpec

H = "def handler(event, context):\n    return 'ok'\n"


def app(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.yaml").write_text(textwrap.dedent(text))
    (root / "h.py").write_text(H)
    return root


def error(root: Path) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_app(root)
    return info.value


def test_function_keys_override_the_apps(tmp_path: Path) -> None:
    spec = load_app(app(tmp_path, """\
        name: shop
        rollout:
          strategy: linear:20%:1m
          rollback_on: error_rate > 1%
          min_requests: 50
          bake: 5m
          waves: [eu, [us, ap]]
        functions:
          pay:
            handler: h.handler
            rollout: {strategy: canary:5%:10m, on_region_failure: stop}
          cart:
            handler: h.handler
        """))
    assert spec.rollouts["pay"] == RolloutSpec(
        strategy="canary:5%:10m", rollback_on="error_rate > 1%", min_requests=50,
        bake_s=300.0, waves=(("eu",), ("us", "ap")), on_region_failure="stop")
    assert spec.rollouts["cart"] == RolloutSpec(
        strategy="linear:20%:1m", rollback_on="error_rate > 1%", min_requests=50,
        bake_s=300.0, waves=(("eu",), ("us", "ap")))


def test_no_block_no_settings_and_the_short_form(tmp_path: Path) -> None:
    assert load_app(app(tmp_path / "a", "functions:\n  f: {handler: h.handler}\n")
                    ).rollouts == {}
    seed = load_app(app(tmp_path / "b", """\
        rollout: {strategy: all-at-once}
        handlers:
          - {function: f, event: http, handler: h.handler}
        """))
    assert seed.rollouts == {"f": RolloutSpec(strategy="all-at-once")}


@pytest.mark.parametrize(("block", "line", "field", "words"), [
    ("rollout: {strategy: canary:0%:5m}", 3, "rollout.strategy", "canary"),
    ("rollout: {strategy: sideways}", 3, "rollout.strategy", "sideways"),
    ("rollout: {rollback_on: latency > 2}", 3, "rollout.rollback_on", "latency"),
    ("rollout: {min_requests: 0}", 3, "rollout.min_requests", "1 to 1000000"),
    ("rollout: {bake: soon}", 3, "rollout.bake", "30s, 5m or 1h"),
    ("rollout: {waves: [eu, eu]}", 3, "rollout.waves", "two waves"),
    ("rollout: {on_region_failure: panic}", 3, "rollout.on_region_failure", "rollback-all"),
    ("rollout: {stratgey: canary:10%:5m}", 3, "rollout.stratgey", "strategy"),
])
def test_bad_keys_are_named(tmp_path: Path, block: str, line: int, field: str,
                            words: str) -> None:
    err = error(app(tmp_path, f"functions:\n  f:\n    handler: h.handler\n    {block}\n"))
    assert err.line in (line, line + 1), str(err)
    assert err.field is not None and err.field.endswith(field), str(err)
    assert words in str(err)
