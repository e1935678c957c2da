"""The Lambda Invoke API beside the control API's own invoke, one client at a time.

    python bench/lambda_invoke.py [--calls 500] [--rounds 3]

One ``nimbus up`` serving the seed ``hello``; sequential calls, measured in
turns (A B C, A B C, ...; medians of the rounds' figures):

- ``/v1 invoke``: ``POST /v1/functions/hello/invoke`` with the bearer token
  (httpx, one kept-alive connection);
- ``boto3 invoke``: ``boto3.client("lambda").invoke`` (SigV4 signing and
  checking, the flush and log open that a stack trace needs);
- ``boto3 invoke, Tail``: the same with ``LogType="Tail"``.

Prints p50 and p99 latency in ms and calls per second for each. boto3's own
work (building, signing and parsing the request) is on the client's side of
the figures; the client and the server share the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import httpx
import orjson
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import ROOT, nimbus_up  # noqa: E402
from nimbus.control.sigv4 import credentials_for  # noqa: E402


def measure(call: Callable[[], None], calls: int) -> tuple[float, float, float]:
    for _ in range(20):  # warm: instance, connections, caches
        call()
    took = []
    start = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        call()
        took.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    took.sort()
    return (took[len(took) // 2] * 1000, took[int(len(took) * 0.99) - 1] * 1000,
            calls / total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with nimbus_up(ROOT / "examples" / "hello") as (_url, state, _proc):
        control = orjson.loads((state / "control.json").read_bytes())["control_url"]
        token = (state / "token").read_text().strip()
        kid, secret = credentials_for(token)
        http = httpx.Client(base_url=control, headers={"authorization": f"Bearer {token}"})
        lam = boto3.client("lambda", endpoint_url=control, region_name="us-east-1",
                           aws_access_key_id=kid, aws_secret_access_key=secret,
                           config=Config(retries={"max_attempts": 1}))

        def v1() -> None:
            assert http.post("/v1/functions/hello/invoke", content=b"{}").status_code == 200

        def sdk() -> None:
            assert lam.invoke(FunctionName="hello", Payload=b"{}")["StatusCode"] == 200

        def tail() -> None:
            assert "LogResult" in lam.invoke(FunctionName="hello", Payload=b"{}",
                                             LogType="Tail")

        kinds = {"/v1 invoke": v1, "boto3 invoke": sdk, "boto3 invoke, Tail": tail}
        got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for name, call in kinds.items():
                got[name].append(measure(call, args.calls))
        print(f"{'':22} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9}   "
              f"({args.calls} sequential calls, median of {args.rounds} rounds)")
        for name, rows in got.items():
            p50, p99, rate = (statistics.median(r[i] for r in rows) for i in range(3))
            print(f"{name:22} {p50:8.2f} {p99:8.2f} {rate:9.0f}")
        http.close()


if __name__ == "__main__":
    main()
