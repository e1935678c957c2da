"""Cold start: time from asking for a new instance to its first response.

    python bench/coldstart.py [--starts 200]

Each trial forks a fresh instance of the seed ``hello`` from the zygote,
waits for it to import the handler, sends one invocation and takes the
answer; then stops the instance. Prints p50/p99 and, side by side, the cost
of the alternative a zygote avoids: a fresh ``python -c 'import hello'``
interpreter per instance, and the same forks under full containment (a uid,
a filesystem view, a private /tmp and a cgroup per instance; needs root)
beside ``rlimits`` only. Goal: p50 <= 5 ms, containment included.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import ROOT  # noqa: E402
from nimbus.manifest.model import FunctionSpec  # noqa: E402
from nimbus.observe.logs import LogSink  # noqa: E402
from nimbus.worker.containment import Containment  # noqa: E402
from nimbus.worker.deps import BASE, DepSet  # noqa: E402
from nimbus.worker.target import Target, code_dir_for  # noqa: E402
from nimbus.worker.worker import Worker  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


JINJA_HANDLER = """\
import jinja2

TEMPLATE = jinja2.Template("Hello, {{ name }}!")

def hello(event, context):
    return {"statusCode": 200, "body": TEMPLATE.render(name="World")}
"""


async def trials(n: int, handler: str | None = None,
                 deps: DepSet | None = None, containment: str = "rlimits") -> list[float]:
    """Cold starts of a hello handler (the seed's, or ``handler``'s source),
    forked from the zygote of ``deps`` (default: what the worker picks)."""
    state = Path(tempfile.mkdtemp(prefix="nimbus-cold-"))
    try:
        code = code_dir_for(state, "bench")
        code.mkdir(parents=True)
        if handler is None:
            shutil.copy(ROOT / "examples" / "hello" / "hello.py", code / "hello.py")
        else:
            (code / "hello.py").write_text(handler)
        compileall.compile_dir(str(code), quiet=2)  # as a deploy does
        worker = Worker(state, LogSink(state / "logs"),
                        containment=Containment.create(state, containment))
        await worker.start()
        target = Target("bench", 1, FunctionSpec("hello", "hello", "hello"), "bench", None)
        pool = worker.pool(target)
        if deps is not None:
            pool.deps = deps
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            inst = await pool.ensure_warm()
            result = await inst.invoke(f"cold-{i}", {}, 5.0)
            out.append((time.perf_counter() - t0) * 1000)
            assert result["body"] == "Hello, World!", result
            pool.instances.remove(inst)
            await inst.stop(1.0)
        await worker.aclose()
        return out
    finally:
        shutil.rmtree(state, ignore_errors=True)


def interpreter_starts(n: int) -> list[float]:
    out = []
    hello_dir = ROOT / "examples" / "hello"
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import hello; hello.hello({}, None)"],
                       cwd=hello_dir, check=True)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def row(name: str, xs: list[float]) -> None:
    print(f"{name:44}{pct(xs, .5):>10.2f}{pct(xs, .99):>10.2f}"
          f"{statistics.mean(xs):>10.2f}   ({len(xs)} starts)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=200)
    args = ap.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    cold = run(trials(args.starts))
    fresh = interpreter_starts(max(20, args.starts // 10))
    print(f"{'':44}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    row("seed hello: fork from zygote + invoke", cold)
    row("seed hello: fresh interpreter + import", fresh)
    print(f"ratio fresh/nimbus p50: {pct(fresh, .5) / pct(cold, .5):.1f}x")
    contained = run(trials(args.starts, containment="auto"))
    mode = Containment.create(Path(tempfile.mkdtemp()), "auto").mode
    row(f"seed hello: containment {mode}", contained)
    print(f"containment {mode} adds {pct(contained, .5) - pct(cold, .5):+.2f} ms p50, "
          f"{pct(contained, .99) - pct(cold, .99):+.2f} ms p99")
    n = max(20, args.starts // 4)
    with_deps = run(trials(n, JINJA_HANDLER))  # the worker preloads jinja2 (top-level import)
    without = run(trials(n, JINJA_HANDLER, deps=BASE))  # forced onto the base zygote
    row("jinja2 hello: dependency-set zygote", with_deps)
    row("jinja2 hello: base zygote (imports jinja2)", without)
    print(f"ratio base/dependency-set p50: {pct(without, .5) / pct(with_deps, .5):.1f}x")


if __name__ == "__main__":
    main()
