"""Custom runtimes beside the zygote: the same trivial handler three ways.

    python bench/runtime_api.py [--starts 30] [--seconds 4] [--rounds 3]
                                [--containment rlimits|auto]

(i) a Python function forked from the zygote, (ii) ``awslambdaric`` running
the same Python handler through the Lambda Runtime API (``runtime:
provided.al2023``, bootstrap ``exec python -m awslambdaric``), (iii) a shell
bootstrap that speaks the Runtime API with curl, as AWS's custom-runtime
tutorial does.

Cold start: a new instance until its first answer (fork, the runtime's own
start-up, its first ``next``, one invocation), ``--starts`` times each,
through the worker as a deploy or a scale-from-zero starts one. Warm: one
``nimbus up`` serving all three, wrk at 1 connection (latency, requests/s)
and 4 connections (requests/s), measured in turns (ABC ABC ..., medians).
Prints figures and ratios to the zygote path, and the CPU time per request
of the whole process tree (the figure a loaded machine moves least). Needs
wrk and curl.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import nimbus_up, tree_cpu_s, wrk  # noqa: E402
from nimbus.manifest.model import FunctionSpec  # noqa: E402
from nimbus.observe.logs import LogSink  # noqa: E402
from nimbus.worker.containment import Containment  # noqa: E402
from nimbus.worker.target import Target, code_dir_for  # noqa: E402
from nimbus.worker.worker import Worker  # noqa: E402

BODY = "Hello, World!"
PY_HANDLER = f"def hello(event, context):\n    return {{'statusCode': 200, 'body': {BODY!r}}}\n"
RIC_BOOTSTRAP = '#!/bin/sh\nexec "$RIC_PYTHON" -m awslambdaric "$_HANDLER"\n'
CURL_BOOTSTRAP = """\
#!/bin/bash
set -euo pipefail
source $LAMBDA_TASK_ROOT/"$(echo $_HANDLER | cut -d. -f1).sh"
while true
do
  HEADERS="$(mktemp)"
  EVENT_DATA=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  rm -f "$HEADERS"
  RESPONSE=$($(echo "$_HANDLER" | cut -d. -f2) "$EVENT_DATA")
  curl -sS "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response" \\
    -d "$RESPONSE" > /dev/null
done
"""  # noqa: E501
CURL_FUNCTION = f"""\
function handler () {{
  echo '{{"statusCode": 200, "body": "{BODY}"}}'
}}
"""

# name: (handler as written, runtime, files)
SIDES: dict[str, tuple[str, str, dict[str, str]]] = {
    "python (zygote)": ("hello.hello", "python3", {"hello.py": PY_HANDLER}),
    "awslambdaric": ("hello.hello", "provided.al2023",
                     {"hello.py": PY_HANDLER, "bootstrap": RIC_BOOTSTRAP}),
    "curl bootstrap": ("function.handler", "provided.al2023",
                       {"function.sh": CURL_FUNCTION, "bootstrap": CURL_BOOTSTRAP}),
}
ROUTES = {"python (zygote)": "/py", "awslambdaric": "/ric", "curl bootstrap": "/sh"}


def write_code(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755 if name == "bootstrap" else 0o644)


def spec_for(name: str) -> FunctionSpec:
    handler, runtime, _files = SIDES[name]
    module, func = ("", handler) if runtime != "python3" else handler.split(".")
    return FunctionSpec("hello", module, func, runtime=runtime,
                        env=(("RIC_PYTHON", sys.executable),))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def cold_starts(name: str, n: int, containment: str) -> list[float]:
    """Milliseconds from asking the pool for a new instance to its first answer."""
    state = Path(tempfile.mkdtemp(prefix="nimbus-rtapi-"))
    try:
        write_code(code_dir_for(state, "bench"), SIDES[name][2])
        worker = Worker(state, LogSink(state / "logs"),
                        containment=Containment.create(state, containment))
        await worker.start()
        pool = worker.pool(Target("bench", 1, spec_for(name), "bench", None))
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            inst = await pool.ensure_warm()
            result = await inst.invoke(f"cold-{i}", {}, 10.0)
            out.append((time.perf_counter() - t0) * 1000)
            assert result == {"statusCode": 200, "body": BODY}, result
            pool.instances.remove(inst)
            await inst.stop(1.0)
        await worker.aclose()
        return out
    finally:
        shutil.rmtree(state, ignore_errors=True)


def write_apps(root: Path) -> dict[str, Path]:
    """One app per side (each custom runtime's folder holds its bootstrap)."""
    apps = {}
    for i, (name, (handler, runtime, files)) in enumerate(SIDES.items()):
        app = root / f"side{i}"
        write_code(app, files)
        (app / "app.yaml").write_text(
            f"name: side{i}\nfunctions:\n  f{i}:\n    handler: {handler}\n"
            f"    runtime: {runtime}\n    env: {{RIC_PYTHON: \"{sys.executable}\"}}\n"
            f"    http: [{{method: GET, path: {ROUTES[name]}}}]\n")
        apps[name] = app
    return apps


def warm(seconds: int, rounds: int, containment: str) -> dict[str, dict[str, float]]:
    root = Path(tempfile.mkdtemp(prefix="nimbus-rtapi-apps-"))
    try:
        apps = write_apps(root)
        first, *rest = apps.values()
        with nimbus_up(first, ROUTES["python (zygote)"], "--containment",
                       containment) as (url, state, proc):
            for app in rest:
                subprocess.run([sys.executable, "-m", "nimbus.cli.main", "deploy", str(app),
                                "--state-dir", str(state)], check=True, capture_output=True)
            got: dict[str, list[dict[str, float]]] = {k: [] for k in SIDES}
            for name in SIDES:
                wrk(url + ROUTES[name], 4, 2)  # warm up: instances started
            for _ in range(rounds):
                for name in SIDES:
                    one = wrk(url + ROUTES[name], 1, seconds)
                    cpu = tree_cpu_s([proc.pid], reaped=True)
                    four = wrk(url + ROUTES[name], 4, seconds)
                    cpu = tree_cpu_s([proc.pid], reaped=True) - cpu
                    got[name].append({"p50_1": one["p50_ms"], "p99_1": one["p99_ms"],
                                      "rps1": one["rps"], "rps4": four["rps"],
                                      "cpu_us": cpu / max(four["requests"], 1) * 1e6,
                                      "errors": one["errors"] + four["errors"]})
        return {k: {f: statistics.median(r[f] for r in v) for f in v[0]}
                for k, v in got.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starts", type=int, default=30)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--containment", choices=("rlimits", "auto"), default="rlimits")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is not installed: apt-get install curl")
    cold = {name: asyncio.run(cold_starts(name, args.starts, args.containment))
            for name in SIDES}
    base = cold["python (zygote)"]
    print(f"cold start, ms ({args.starts} starts each, containment {args.containment})")
    print(f"{'':20}{'p50':>10}{'p99':>10}{'mean':>10}{'p50 / zygote':>14}")
    for name, xs in cold.items():
        print(f"{name:20}{pct(xs, .5):>10.2f}{pct(xs, .99):>10.2f}"
              f"{statistics.mean(xs):>10.2f}{pct(xs, .5) / pct(base, .5):>13.1f}x")
    med = warm(args.seconds, args.rounds, args.containment)
    b = med["python (zygote)"]
    print(f"\nwarm, medians of {args.rounds} rounds of {args.seconds} s (wrk, one nimbus up)")
    print(f"{'':20}{'p50 ms @1':>10}{'p99 ms @1':>10}{'req/s @1':>10}{'req/s @4':>10}"
          f"{'p50 added':>11}{'rps@4 ratio':>12}{'CPU us/req':>11}{'errors':>8}")
    for name, m in med.items():
        print(f"{name:20}{m['p50_1']:>10.3f}{m['p99_1']:>10.3f}{m['rps1']:>10.0f}"
              f"{m['rps4']:>10.0f}{m['p50_1'] - b['p50_1']:>+9.3f}ms"
              f"{m['rps4'] / b['rps4']:>11.3g}x{m['cpu_us']:>11.0f}{m['errors']:>8.0f}")
    print("CPU us/req: nimbus and every process under it (instances, runtimes, what they "
          "started) per request at 4 connections")


if __name__ == "__main__":
    main()
