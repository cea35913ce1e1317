"""The gateway's own CPU time per streamed token, without an engine's noise.

    python -m bench.gateway                      # both dialects, 20 streams of 64 tokens each
    python -m bench.gateway --loop asyncio --http h11

Runs kiln's app under uvicorn in this process, with a real worker process whose engine
is the fake one: it emits a 64-word reply one word per ``--delay`` seconds (9 ms, about
the bundled model's decode step on two cores), so the gateway wakes once per token as it
does in front of llama.cpp at concurrency 1. A client in another process streams the
replies one after the other; the report is this process's CPU time (every thread of the
gateway, not the worker, not the client) and its context switches, per streamed token.

Why this is its own bench: at concurrency 1 on two cores, llama.cpp's two decode threads
use both cores, and every millisecond the gateway runs per token is taken from one of
them, which stalls the other at the next barrier. What the gateway costs per token is
mostly what a wake-up from a 9 ms sleep costs, with cold caches: a few microseconds of
Python when warm take tens when cold, so the count of distinct layers a token passes
through matters more than their speed in a hot loop (``--delay 0`` shows the warm cost).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import load, servers

MODEL = "smollm2:135m"  # the bundled model's name; its GGUF is never loaded here
REPLY = " ".join(f"w{i}" for i in range(64))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--delay", type=float, default=0.009, help="seconds between two tokens")
    p.add_argument("--streams", type=int, default=20, help="streamed requests per dialect")
    p.add_argument("--dialects", default="openai,ollama")
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    p.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # the client process
    return p.parse_args(argv)


# -- the client (another process, so its CPU time is not the gateway's) -------------------

async def stream_tokens(url: str, dialect: str, streams: int) -> tuple[int, float]:
    """Streams ``streams`` replies one after the other, with the HTTP bench's client; the
    tokens the server reported and the median time to the first token (seconds)."""
    s = (await load.run_round(url, dialect, MODEL, 1, streams, load.Sampling(max_tokens=100),
                              "gateway")).summary()
    if s["completed"] != streams:
        raise SystemExit(f"{dialect}: {s['completed']} of {streams} streams completed: {s['error_samples']}")
    return int(s["tokens"]), float(s["ttft_p50_s"] or 0.0)


# -- the gateway --------------------------------------------------------------------------

def context_switches() -> int:
    total = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/status") as f:
            total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return total


def measure(url: str, dialect: str, streams: int) -> dict[str, Any]:
    def client(n: int) -> tuple[int, float]:
        out = subprocess.run([sys.executable, "-m", "bench.gateway", "--client", url, "--dialects", dialect,
                              "--streams", str(n)], capture_output=True, text=True, check=True)
        tokens, ttft = out.stdout.split()[-2:]
        return int(tokens), float(ttft)

    client(2)  # loads the worker, warms the routes
    switches, cpu, wall = context_switches(), time.process_time(), time.monotonic()
    tokens, ttft = client(streams)
    cpu, wall, switches = time.process_time() - cpu, time.monotonic() - wall, context_switches() - switches
    if tokens == 0:
        raise RuntimeError(f"no token came back on {dialect}")
    return {"dialect": dialect, "tokens": tokens, "cpu_ms_per_token": 1000 * cpu / tokens,
            "switches_per_token": switches / tokens, "tokens_per_s": tokens / wall, "ttft_ms": ttft * 1000}


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.client:
        runs = [asyncio.run(stream_tokens(a.client, d, a.streams)) for d in a.dialects.split(",")]
        print(sum(n for n, _ in runs), max(t for _, t in runs))
        return
    import uvicorn

    from backends.worker import WorkerBackend
    from server.app import create_app
    from server.settings import Settings

    def fake_worker(spec: Any) -> WorkerBackend:
        spec.backend = "fake"
        spec.extra = {**spec.extra, "delay": a.delay, "reply": REPLY}
        return WorkerBackend(spec)

    with tempfile.TemporaryDirectory(prefix="kiln-bench-gateway-") as tmp:
        os.environ["KILN_CONFIG"] = str(Path(tmp) / "none.toml")  # the user's config file stays out
        settings = Settings(models=Path(tmp) / "models", log_level="WARNING")
        app = create_app(settings, fake_worker)
        port = a.port or servers.free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               access_log=False, loop=a.loop, http=a.http))
        results: list[dict[str, Any]] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                _wait_started(server)
                for dialect in a.dialects.split(","):
                    results.append(measure(f"http://127.0.0.1:{port}", dialect, a.streams))
            except BaseException as e:  # noqa: BLE001 - reported after the server stops
                failure.append(e)
            finally:
                server.should_exit = True

        threading.Thread(target=run, daemon=True).start()
        server.run()
        if failure:
            raise SystemExit(f"bench.gateway failed: {failure[0]}")
        print(f"event loop {_resolved(a.loop, 'uvloop', 'asyncio')}, HTTP {_resolved(a.http, 'httptools', 'h11')}; "
              f"a token every {a.delay * 1000:g} ms; "
              f"{a.streams} streams per dialect")
        print("| dialect | tokens | gateway CPU ms / token | context switches / token | tokens/s | TTFT p50 ms |")
        print("|---|--:|--:|--:|--:|--:|")
        for r in results:
            print(f"| {r['dialect']} | {r['tokens']} | {r['cpu_ms_per_token']:.3f} | "
                  f"{r['switches_per_token']:.2f} | {r['tokens_per_s']:.1f} | {r['ttft_ms']:.1f} |")


def _resolved(choice: str, fast: str, fallback: str) -> str:
    """What uvicorn's "auto" picks: the C implementation when it is installed."""
    if choice != "auto":
        return choice
    import importlib.util

    return fast if importlib.util.find_spec(fast) else fallback


def _wait_started(server: Any, timeout: float = 30.0) -> None:
    """Until uvicorn has run the app's start-up and listens."""
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
