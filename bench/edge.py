"""The edge's cost: the seed handler through ``nimbus edge`` vs straight to
the region's gateway, in the same run.

    python bench/edge.py [--seconds 5] [--rounds 3]

Two ``nimbus up`` regions (eu on 127.0.0.2, us on 127.0.0.3) behind an
edge; with the default failover policy every request goes to eu's gateway,
so both sides end at the same gateway. wrk measures requests/s at 32
connections and p50/p99 at 1 connection, edge and gateway in turns (ABAB...,
medians), and the CPU the region (and the edge) spent per request: on a
machine with few cores the edge and the gateway share them, so the
throughput ratio is bounded by CPU; the CPU per request shows the edge's own
cost whatever the core count. Goal: through the edge >= 0.7x the gateway's
throughput and <= +0.2 ms at p50 with 1 connection. Needs wrk (apt-get
install wrk).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._edgeworld import edge_world  # noqa: E402
from bench._harness import tree_cpu_s, wrk  # noqa: E402


def measure(url: str, seconds: int, pids: list[int]) -> dict[str, float]:
    cpu = tree_cpu_s(pids)
    busy = wrk(url, 32, seconds)
    cpu = tree_cpu_s(pids) - cpu
    single = wrk(url, 1, seconds)
    return {"rps32": busy["rps"], "p50_32": busy["p50_ms"], "p99_32": busy["p99_ms"],
            "p50_1": single["p50_ms"], "p99_1": single["p99_ms"],
            "cpu_us": cpu / max(busy["requests"], 1) * 1e6,
            "errors": busy["errors"] + single["errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with edge_world() as world:
        edge, gateway = world.edge, world.regions[0].gateway_url
        assert world.regions[0].proc is not None
        region_pids = [world.regions[0].proc.pid]
        for url in (gateway, edge):
            wrk(url + "/hello", 8, 2)  # warm up: instances, connection pools
        sides: dict[str, list[dict[str, float]]] = {"gateway": [], "edge": []}
        for n in range(args.rounds):
            sides["gateway"].append(measure(gateway + "/hello", args.seconds, region_pids))
            sides["edge"].append(measure(edge + "/hello", args.seconds,
                                         [*region_pids, world.edge_pid]))
            print(f"round {n + 1}: gateway {sides['gateway'][-1]['rps32']:.0f}/s, "
                  f"edge {sides['edge'][-1]['rps32']:.0f}/s", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in sides.items()}
    gw, ed = med["gateway"], med["edge"]
    print(f"\nmedians of {args.rounds} rounds, {args.seconds} s each, hello world")
    print(f"{'':20}{'gateway':>12}{'edge':>12}{'ratio/added':>14}")
    print(f"{'req/s @32 conns':20}{gw['rps32']:>12.0f}{ed['rps32']:>12.0f}"
          f"{ed['rps32'] / gw['rps32']:>13.2f}x")
    for key, label in (("p50_1", "p50 ms @1 conn"), ("p99_1", "p99 ms @1 conn"),
                       ("p50_32", "p50 ms @32 conns"), ("p99_32", "p99 ms @32 conns")):
        print(f"{label:20}{gw[key]:>12.3f}{ed[key]:>12.3f}{ed[key] - gw[key]:>+13.3f}ms")
    print(f"{'CPU us/request @32':20}{gw['cpu_us']:>12.0f}{ed['cpu_us']:>12.0f}"
          f"{ed['cpu_us'] - gw['cpu_us']:>+13.0f}us  (the edge's own cost per request)")
    print(f"{'errors':20}{gw['errors']:>12.0f}{ed['errors']:>12.0f}")
    ratio, added = ed["rps32"] / gw["rps32"], ed["p50_1"] - gw["p50_1"]
    print(f"goal: >= 0.70x and <= +0.200 ms: {ratio:.2f}x "
          f"({'met' if ratio >= 0.7 else 'missed'}), {added:+.3f} ms "
          f"({'met' if added <= 0.2 else 'missed'})")


if __name__ == "__main__":
    main()
