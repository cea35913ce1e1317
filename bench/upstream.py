"""The cost of the upstream hop (research note scaleout.md §4.3, U3): one kiln node on
the bundled model, reached directly and through a front kiln whose ``[[upstreams]]``
points at it, in alternating order, streamed, at c=1 and c=8.

    python -m bench.upstream [--tokens 64] [--reps 3] [--api ollama|openai] [--fake DELAY]

``--fake 0.016``: the node is the fake engine of tests/upstream at ~60 tokens/s per
stream (this machine's SmolLM2 rate), so only the hop differs, whatever else the
machine runs.

Prints one JSON line per round and the median tok/s ratio and TTFT difference per
concurrency. Both servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import load
from backends.bundled import smollm2_path
from bench.servers import Config, Target, kiln, running

FAKE = Path(__file__).resolve().parent.parent / "tests" / "upstream" / "fake_upstream.py"


async def _round(url: str, model: str, c: int, per: int, s: load.Sampling) -> load.Round:
    """``c`` clients, ``per`` requests each, short distinct prompts: the hop's cost is per
    token, so the engine's prefill should not dominate the round (bench.load's essay
    prompts take seconds each to prefill on a loaded 2-core machine)."""
    async with load.client(c) as client:
        async def one(k: int) -> list[load.Outcome]:
            return [await load.request(client, url, "openai", model, [{"role": "user", "content":
                    f"Count from {k * per + j} upwards, one number per line."}], s) for j in range(per)]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(k) for k in range(c)))
        wall = time.perf_counter() - t0
    return load.Round(c, c * per, wall, [o for r in results for o in r])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--api", default="ollama", choices=("ollama", "openai"))
    ap.add_argument("--fake", type=float, default=0.0, metavar="DELAY",
                    help="a fake node (tests/upstream/fake_upstream.py) with this delay per token instead of kiln")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-upstream-bench-"))
    gguf = smollm2_path()
    assert gguf is not None, "the bundled model is not installed"
    cfg = Config(gguf=gguf, threads=2, parallel=8, work_dir=tmp)
    node_t = kiln(cfg, name="node")
    if args.fake:  # the fake node at a real engine's pace: only the hop's cost differs
        node_t = Target("node", "smollm2:135m", argv=[sys.executable, str(FAKE), "--port", "{port}", "--models",
                                                        "smollm2:135m", "--tokens", str(args.tokens),
                                                        "--delay", str(args.fake)], ready_path="/health")
    with running(node_t, tmp) as node:
        url = node.url + ("/v1" if args.api == "openai" else "")
        config = tmp / "front.toml"
        config.write_text(f'[[upstreams]]\nname = "node"\napi = "{args.api}"\nurls = ["{url}"]\n'
                          f'models = {{"remote" = "smollm2:135m"}}\n')
        front_t = kiln(cfg, name="front", extra_env={"KILN_CONFIG": str(config),
                                                     "KILN_MODELS": str(tmp / "front-models")})
        with running(front_t, tmp) as front:
            targets = {"direct": (node.url, "smollm2:135m"), "upstream": (front.url, "remote")}
            s = load.Sampling(max_tokens=args.tokens, temperature=0.0, seed=1)
            for name, (u, m) in targets.items():
                asyncio.run(load.warm_up(u, "openai", m, 8))
            rows: dict[tuple[str, int], list[dict]] = {}
            for rep in range(args.reps):
                for c, per in ((1, 3), (8, 1)):
                    order = list(targets) if rep % 2 == 0 else list(reversed(targets))
                    for name in order:
                        u, m = targets[name]
                        r = asyncio.run(_round(u, m, c, per, s)).summary()
                        rows.setdefault((name, c), []).append(r)
                        print(json.dumps({"target": name, "rep": rep, **{k: r[k] for k in (
                            "concurrency", "agg_tok_s", "ttft_p50_s", "completed", "errors")}}), flush=True)
            for c in (1, 8):
                d = statistics.median(r["agg_tok_s"] for r in rows[("direct", c)])
                p = statistics.median(r["agg_tok_s"] for r in rows[("upstream", c)])
                dt = statistics.median(r["ttft_p50_s"] for r in rows[("direct", c)])
                pt = statistics.median(r["ttft_p50_s"] for r in rows[("upstream", c)])
                print(json.dumps({"concurrency": c, "direct_tok_s": round(d, 1), "upstream_tok_s": round(p, 1),
                                  "ratio": round(p / d, 3), "ttft_p50_direct_ms": round(dt * 1e3, 1),
                                  "ttft_p50_upstream_ms": round(pt * 1e3, 1)}), flush=True)


if __name__ == "__main__":
    main()
