"""The cost of the upstream hop and prefix affinity through it (research note
scaleout.md §4.3, U3 and U13). Every server listens on 127.0.0.1 only.

    python -m bench.upstream [--tokens 64] [--reps 3] [--api ollama|openai]
                             [--engine kiln|llama-server|fake] [--fake DELAY] [--agent N]
                             [--kiln-threads 0]

Hop (default): one node on the bundled model, reached directly and through a front
kiln whose ``[[upstreams]]`` points at it, in alternating order, streamed, at c=1 and
c=8; one JSON line per round, then per concurrency the ratio of the median tok/s, the
median of each rep's own ratio (its two rounds ran back to back) and the TTFT
difference. ``--engine llama-server``: the node is llama.cpp's own server
(bench/build_llama_server.sh builds it), reached with ``api = "openai"``.
``--engine fake --fake 0.016``: the fake engine of tests/upstream at ~60 tokens/s per
stream, so only the hop differs, whatever else the machine runs.

``--agent N`` (U13): two kiln nodes as replicas of one ``api = "ollama"`` upstream, and
N agent sessions (bench.load.agent_session: a cold 2,000-token system prompt, then a
second turn on the same prefix) directly on one node and through the front,
alternating. Prints each session's second/first TTFT ratio, the replica each turn went
to, and the medians: prefix affinity keeps the front's ratio within 1.5x of one node's
when the second turn lands where the first left its prefix cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import load
from backends.bundled import smollm2_path
from bench.servers import Config, Running, Target, build_llama_server, kiln, llama_server, running

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


def _front(cfg: Config, tmp: Path, upstream: str) -> Target:
    # A cold 2,000-token prefill took 136 s on this machine under load: longer than the
    # default first-token timeout (120 s), which would re-send it to the other replica.
    config = tmp / "front.toml"
    config.write_text(upstream + "first_token_timeout = 900\n")
    return kiln(cfg, name="front", extra_env={"KILN_CONFIG": str(config), "KILN_MODELS": str(tmp / "front-models")})


def hop(args: argparse.Namespace, cfg: Config, tmp: Path) -> None:
    node_t = kiln(cfg, name="node")
    api, node_model = args.api, "smollm2:135m"
    if args.engine == "fake":  # the fake node at a real engine's pace: only the hop's cost differs
        node_t = Target("node", node_model, argv=[sys.executable, str(FAKE), "--port", "{port}", "--models",
                                                  node_model, "--tokens", str(args.tokens),
                                                  "--delay", str(args.fake)], ready_path="/health")
    elif args.engine == "llama-server":
        node_t = llama_server(cfg, build_llama_server(Path.home() / ".cache" / "kiln-bench"))
        api, node_model = "openai", node_t.model
    with running(node_t, tmp) as node:
        url = node.url + ("/v1" if api == "openai" else "")
        front_t = _front(cfg, tmp, f'[[upstreams]]\nname = "node"\napi = "{api}"\nurls = ["{url}"]\n'
                                   f'models = {{"remote" = "{node_model}"}}\n')
        with running(front_t, tmp) as front:
            targets = {"direct": (node.url, node_model), "upstream": (front.url, "remote")}
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
                # Each rep's two rounds ran back to back: their ratio is what the hop costs
                # while the rest of the machine is what it was then (a shared machine's load
                # moves between reps; the median of those ratios is the robust figure).
                paired = statistics.median(u["agg_tok_s"] / d_["agg_tok_s"]
                                           for u, d_ in zip(rows[("upstream", c)], rows[("direct", c)]))
                print(json.dumps({"engine": args.engine, "api": api, "concurrency": c, "direct_tok_s": round(d, 1),
                                  "upstream_tok_s": round(p, 1), "ratio": round(p / d, 3),
                                  "paired_ratio": round(paired, 3), "reps": args.reps,
                                  "ttft_p50_direct_ms": round(dt * 1e3, 1),
                                  "ttft_p50_upstream_ms": round(pt * 1e3, 1)}), flush=True)


def _sent(front: Running) -> list[int]:
    reps = httpx.get(front.url + "/health", timeout=10).json()["upstreams"]["nodes"]["replicas"]
    return [r["requests"] for r in reps]


def agent(args: argparse.Namespace, cfg: Config, tmp: Path) -> None:
    s = load.Sampling(max_tokens=16, temperature=0.0, seed=1)
    n1 = kiln(cfg, name="node1", extra_env={"KILN_MODELS": str(tmp / "node1-models")})
    n2 = kiln(cfg, name="node2", extra_env={"KILN_MODELS": str(tmp / "node2-models")})
    with running(n1, tmp) as node1, running(n2, tmp) as node2:
        front_t = _front(cfg, tmp, f'[[upstreams]]\nname = "nodes"\napi = "ollama"\n'
                                   f'urls = ["{node1.url}", "{node2.url}"]\nmodels = {{"remote" = "smollm2:135m"}}\n')
        with running(front_t, tmp) as front:
            for u, m in ((node1.url, "smollm2:135m"), (node2.url, "smollm2:135m")):
                asyncio.run(load.warm_up(u, "openai", m, 2))
            ratios: dict[str, list[float]] = {"direct": [], "upstream": []}
            same = 0
            for i in range(args.agent):
                for name in (("direct", "upstream") if i % 2 == 0 else ("upstream", "direct")):
                    url, model = (node1.url, "smollm2:135m") if name == "direct" else (front.url, "remote")
                    before = _sent(front)
                    # two sessions' worth of turns: the front's /health says where each went
                    out: dict[str, Any] = asyncio.run(load.agent_session(url, "openai", model,
                                                                         f"{name}-{i}-{uuid.uuid4().hex[:8]}", s))
                    where = [b - a for a, b in zip(before, _sent(front))]
                    if name == "upstream":
                        same += max(where) == 2  # both turns on one replica
                    if out["ratio"] is not None:
                        ratios[name].append(out["ratio"])
                    print(json.dumps({"target": name, "session": i, "ttft_first_s": out["ttft_first_s"],
                                      "ttft_second_s": out["ttft_second_s"], "ratio": out["ratio"],
                                      "prompt_tokens_first": out["prompt_tokens_first"],
                                      "sent_to_replicas": where if name == "upstream" else None,
                                      "errors": out["errors"]}), flush=True)
            d, u = statistics.median(ratios["direct"]), statistics.median(ratios["upstream"])
            print(json.dumps({"sessions": args.agent, "ratio_direct": round(d, 4), "ratio_upstream": round(u, 4),
                              "upstream_over_direct": round(u / d, 2), "second_turn_on_first_turns_replica":
                              f"{same}/{args.agent}"}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--api", default="ollama", choices=("ollama", "openai"))
    ap.add_argument("--engine", default="kiln", choices=("kiln", "llama-server", "fake"))
    ap.add_argument("--fake", type=float, default=0.0, metavar="DELAY",
                    help="the fake node's delay per token (implies --engine fake)")
    ap.add_argument("--agent", type=int, default=0, metavar="N", help="U13: N agent sessions each way")
    ap.add_argument("--kiln-threads", type=int, default=0,
                    help="KILN_THREADS of the kiln nodes (0: kiln's default, which follows the CPUs left free)")
    args = ap.parse_args()
    if args.fake:
        args.engine = "fake"
    tmp = Path(tempfile.mkdtemp(prefix="kiln-upstream-bench-"))
    gguf = smollm2_path()
    assert gguf is not None, "the bundled model is not installed"
    cfg = Config(gguf=gguf, threads=2, kiln_threads=args.kiln_threads, parallel=8, work_dir=tmp)
    if args.agent:
        agent(args, cfg, tmp)
    else:
        hop(args, cfg, tmp)


if __name__ == "__main__":
    main()
