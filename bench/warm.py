"""Warm requests: the seed ``hello`` through nimbus vs the same handler on bare uvicorn.

    python bench/warm.py [--seconds 10]
    python bench/warm.py --remote [--seconds 5] [--rounds 5]

Prints requests/s at 32 connections and p50/p99 latency at 1 connection for
both, up at once and measured in turns (ABAB..., ``--rounds``; medians: the
machine's drift falls on both sides alike), and the ratios; then
nimbus again with containment off (``--containment rlimits``) to show what
full containment (uid, view, cgroup; needs root) costs on the warm path. Needs
wrk (apt-get install wrk). Goals: throughput ratio >= 0.5, p50
added <= 0.15 ms at 1 connection.

``--remote`` measures the path across processes instead: a gateway process
calling a worker process over TCP frames (``bench/remote_gateway.py`` and
``python -m nimbus.worker.frameserver``, one warm instance, containment
``rlimits``), beside bare uvicorn and ``nimbus up --containment rlimits``,
all up at once and measured in turns (ABC ABC ...), medians printed. Goal:
through a gateway to a worker process >= 0.6x bare uvicorn at 32 connections.

``--observe`` measures what watching costs: three ``nimbus up`` (containment
``rlimits``) up at once and measured in turns, medians printed: nothing on
(``NIMBUS_METRICS=off``, ``--trace off``), metrics on with traces off, and
metrics on with the JSON-lines trace file. Goals: <= 5% throughput cost with
metrics on and traces off, <= 15% with the trace file.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import (  # noqa: E402
    ROOT,
    baseline_up,
    nimbus_up,
    remote_gateway_up,
    token_file,
    tree_cpu_s,
    worker_up,
    wrk,
)


def measure(url: str, seconds: int) -> dict[str, float]:
    wrk(url, 8, 2)  # warm up
    busy = wrk(url, 32, seconds)
    single = wrk(url, 1, seconds)
    return {"rps32": busy["rps"], "errors": busy["errors"] + single["errors"],
            "p50_1": single["p50_ms"], "p99_1": single["p99_ms"],
            "p50_32": busy["p50_ms"], "p99_32": busy["p99_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating rounds of each comparison")
    ap.add_argument("--no-containment", action="store_true",
                    help="skip the containment on/off comparison")
    ap.add_argument("--remote", action="store_true",
                    help="a gateway process to a worker process over TCP frames")
    ap.add_argument("--observe", action="store_true",
                    help="metrics and traces on vs off, side by side")
    args = ap.parse_args()
    if args.remote:
        remote(args.seconds, args.rounds)
        return
    if args.observe:
        observe(args.seconds, args.rounds)
        return
    with baseline_up() as base_url, \
            nimbus_up(ROOT / "examples" / "hello") as (nim_url, _state, _proc):
        bases, nims = [], []
        for _ in range(args.rounds):
            bases.append(measure(base_url + "/hello", args.seconds))
            nims.append(measure(nim_url + "/hello", args.seconds))
    base = medians(bases)
    nim = medians(nims)
    print(f"{'':24}{'bare uvicorn':>14}{'nimbus':>14}{'ratio/added':>14}")
    print(f"{'req/s @32 conns':24}{base['rps32']:>14.0f}{nim['rps32']:>14.0f}"
          f"{nim['rps32'] / base['rps32']:>13.2f}x")
    print(f"{'p50 ms @1 conn':24}{base['p50_1']:>14.3f}{nim['p50_1']:>14.3f}"
          f"{nim['p50_1'] - base['p50_1']:>+13.3f}ms")
    print(f"{'p99 ms @1 conn':24}{base['p99_1']:>14.3f}{nim['p99_1']:>14.3f}"
          f"{nim['p99_1'] - base['p99_1']:>+13.3f}ms")
    print(f"{'p99 ms @32 conns':24}{base['p99_32']:>14.3f}{nim['p99_32']:>14.3f}"
          f"{nim['p99_32'] - base['p99_32']:>+13.3f}ms")
    print(f"{'errors':24}{base['errors']:>14.0f}{nim['errors']:>14.0f}")
    print("req/s @32 conns per round (bare uvicorn / nimbus / ratio): " + ", ".join(
        f"{b['rps32']:.0f}/{n['rps32']:.0f}/{n['rps32'] / b['rps32']:.2f}"
        for b, n in zip(bases, nims, strict=True)))
    if args.no_containment:
        return
    # Containment on vs off: both platforms up at once, measured in turns
    # (ABAB...), medians: the machine's drift falls on both sides alike.
    hello = ROOT / "examples" / "hello"
    with nimbus_up(hello) as (on_url, _s1, _p1), \
            nimbus_up(hello, "/hello", "--containment", "rlimits") as (off_url, _s2, _p2):
        ons, offs = [], []
        for _ in range(args.rounds):
            ons.append(measure(on_url + "/hello", max(2, args.seconds // 2)))
            offs.append(measure(off_url + "/hello", max(2, args.seconds // 2)))
    containment_row(medians(ons), medians(offs))


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(m[k] for m in runs) for k in runs[0]}


def containment_row(on: dict[str, float], off: dict[str, float]) -> None:
    print(f"{'containment (medians)':24}{'rlimits':>14}{'auto':>14}{'ratio/added':>14}")
    print(f"{'req/s @32 conns':24}{off['rps32']:>14.0f}{on['rps32']:>14.0f}"
          f"{on['rps32'] / off['rps32']:>13.2f}x")
    print(f"{'p50 ms @1 conn':24}{off['p50_1']:>14.3f}{on['p50_1']:>14.3f}"
          f"{on['p50_1'] - off['p50_1']:>+13.3f}ms")


OBSERVE_SIDES = {  # name: (environment, nimbus up options)
    "nothing on": ({"NIMBUS_METRICS": "off"}, ("--trace", "off")),
    "metrics": ({}, ("--trace", "off")),
    "metrics+traces": ({}, ("--trace", "file")),
}


def observe(seconds: int, rounds: int) -> None:
    hello = ROOT / "examples" / "hello"
    with contextlib.ExitStack() as stack:
        urls, pids = {}, {}
        for name, (env, opts) in OBSERVE_SIDES.items():
            url, _state, proc = stack.enter_context(nimbus_up(
                hello, "/hello", "--containment", "rlimits", *opts, env=env))
            urls[name], pids[name] = url + "/hello", proc.pid
        got: dict[str, list[dict[str, float]]] = {k: [] for k in urls}
        for url in urls.values():
            wrk(url, 8, 2)  # warm up
        names = list(urls)
        for n in range(rounds):
            # each round starts with another side: none always runs right
            # after the same neighbour's load
            for name in names[n % len(names):] + names[:n % len(names)]:
                url = urls[name]
                cpu = tree_cpu_s([pids[name]])
                busy = wrk(url, 32, seconds)
                cpu = tree_cpu_s([pids[name]]) - cpu
                single = wrk(url, 1, max(2, seconds // 2))
                got[name].append({"rps32": busy["rps"], "p50_32": busy["p50_ms"],
                                  "p50_1": single["p50_ms"],
                                  "cpu_us": cpu / max(busy["requests"], 1) * 1e6,
                                  "errors": busy["errors"] + single["errors"]})
            print(f"round {n + 1}: " + ", ".join(
                f"{k} {v[-1]['rps32']:.0f}/s" for k, v in got.items()), flush=True)
    med = {name: medians(ms) for name, ms in got.items()}
    base = med["nothing on"]
    print(f"\nmedians of {rounds} rounds, {seconds} s each, hello world, containment rlimits")
    print(f"{'':22}" + "".join(f"{name:>16}" for name in med))
    for key, label, fmt in (("rps32", "req/s @32 conns", ".0f"),
                            ("cpu_us", "CPU us/req @32 conns", ".1f"),
                            ("p50_32", "p50 ms @32 conns", ".3f"),
                            ("p50_1", "p50 ms @1 conn", ".3f"),
                            ("errors", "errors", ".0f")):
        print(f"{label:22}" + "".join(f"{m[key]:>16{fmt}}" for m in med.values()))
    print(f"{'CPU us/req range':22}" + "".join(
        f"{min(r['cpu_us'] for r in ms):>8.0f}..{max(r['cpu_us'] for r in ms):<6.0f}"
        for ms in got.values()))
    print(f"{'throughput cost':22}" + "".join(
        f"{(1 - m['rps32'] / base['rps32']) * 100:>15.1f}%" for m in med.values()))
    # CPU per request is what a busy machine's drift moves least: the cost
    # a saturated nimbus would see as throughput
    print(f"{'CPU cost':22}" + "".join(
        f"{(m['cpu_us'] / base['cpu_us'] - 1) * 100:>15.1f}%" for m in med.values()))
    print("goals: metrics <= 5%, metrics+traces <= 15%")


def remote(seconds: int, rounds: int) -> None:
    hello = ROOT / "examples" / "hello"
    base_pids: list[int] = []
    remote_pids: list[int] = []
    with token_file() as token, baseline_up(base_pids) as base_url, \
            worker_up(hello, "bench-w1", token, "--warm", "1", pids=remote_pids) as frames, \
            remote_gateway_up(hello, [("bench-w1", frames)], token) as (remote_url, gw_pid), \
            nimbus_up(hello, "/hello", "--containment", "rlimits") as (up_url, _s, up_proc):
        remote_pids.append(gw_pid)
        sides = {"bare uvicorn": (base_url, base_pids), "remote": (remote_url, remote_pids),
                 "nimbus up": (up_url, [up_proc.pid])}
        got: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        for url, _pids in sides.values():
            wrk(url + "/hello", 8, 2)  # warm up
        for n in range(rounds):
            for name, (url, pids) in sides.items():
                cpu = tree_cpu_s(pids)
                busy = wrk(url + "/hello", 32, seconds)
                cpu = tree_cpu_s(pids) - cpu
                single = wrk(url + "/hello", 1, max(2, seconds // 2))
                got[name].append({"rps32": busy["rps"], "p50_32": busy["p50_ms"],
                                  "p99_32": busy["p99_ms"], "p50_1": single["p50_ms"],
                                  "cpu_us": cpu / max(busy["requests"], 1) * 1e6,
                                  "errors": busy["errors"] + single["errors"]})
            print(f"round {n + 1}: " + ", ".join(
                f"{k} {v[-1]['rps32']:.0f}/s {v[-1]['cpu_us']:.0f} us" for k, v in got.items()),
                flush=True)
    med = {name: {k: statistics.median(m[k] for m in ms) for k in ms[0]}
           for name, ms in got.items()}
    base = med["bare uvicorn"]
    print(f"\nmedians of {rounds} rounds, {seconds} s each, hello world")
    print(f"{'':26}" + "".join(f"{name:>15}" for name in med))
    for key, label, fmt in (("rps32", "req/s @32 conns", ".0f"),
                            ("cpu_us", "CPU us/request @32 conns", ".0f"),
                            ("p50_32", "p50 ms @32 conns", ".3f"),
                            ("p99_32", "p99 ms @32 conns", ".3f"),
                            ("p50_1", "p50 ms @1 conn", ".3f"),
                            ("errors", "errors", ".0f")):
        print(f"{label:26}" + "".join(f"{m[key]:>15{fmt}}" for m in med.values()))
    for name in ("remote", "nimbus up"):
        print(f"{name} / bare uvicorn @32 conns: {med[name]['rps32'] / base['rps32']:.2f}x "
              f"throughput, {med[name]['cpu_us'] / base['cpu_us']:.2f}x CPU per request")


if __name__ == "__main__":
    main()
