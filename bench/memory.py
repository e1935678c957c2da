"""Memory at rest: one idle warm instance, the zygote, and the platform.

    python bench/memory.py

Starts ``nimbus up examples/hello``, sends one request (so one instance is
warm), waits for things to settle, and prints PSS and private memory of each
process from /proc/PID/smaps_rollup, via ``nimbus status``'s API.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._harness import ROOT, nimbus_up  # noqa: E402
from nimbus.observe.memory import memory_of  # noqa: E402


def mb(kb: int) -> str:
    return f"{kb / 1024:8.1f} MB"


def main() -> None:
    with nimbus_up(ROOT / "examples" / "hello") as (url, state, proc):
        for _ in range(100):
            httpx.get(url + "/hello")
        time.sleep(1.0)
        token = (state / "token").read_text().strip()
        import orjson
        ctl = orjson.loads((state / "control.json").read_bytes())["control_url"]
        status = httpx.get(ctl + "/v1/status",
                           headers={"authorization": f"Bearer {token}"}).json()
        rows = [("platform (gateway+control+worker)", status["memory"]["platform"])]
        rows += [(f"zygote ({', '.join(z['preload']) or 'base'})", z["memory"])
                 for z in status["zygotes"] if z["memory"]]
        for f in status["functions"]:
            for i in f["instances"]:
                rows.append((f"idle warm instance of {f['name']}", i["memory"]))
        print(f"{'process':40}{'RSS':>12}{'PSS':>12}{'private':>12}")
        for name, m in rows:
            print(f"{name:40}{mb(m['rss_kb'])}{mb(m['pss_kb'])}{mb(m['private_kb'])}")
        from tests.conftest import descendants
        spares = [p for p in descendants(proc.pid)
                  if p not in {status["pid"]} and memory_of(p)]
        total = sum((memory_of(p) or {}).get("pss_kb", 0) for p in [proc.pid, *spares])
        print(f"{'all processes of nimbus up (PSS sum)':40}{'':12}{mb(total)}")


if __name__ == "__main__":
    main()
