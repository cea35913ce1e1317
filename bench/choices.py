"""``n`` choices against one: the wall time of ``n=4`` (four sequences sampled from one
evaluation of the prompt) over ``n=1``, per engine, through kiln's ``/v1/chat/completions``.

    python -m bench.choices [--n 4] [--tokens 64] [--reps 5] [--engines llamacpp,openvino-cpu]

For each engine in turn (the bundled GGUF on llama.cpp; ``kiln compile --profile cpu`` of
it on OpenVINO GenAI's CPU pipeline), KILN_NUM_PARALLEL = n, kiln's default threads
(``--kiln-threads 0``: llama.cpp's follow the CPUs other processes leave free): after a warm-up,
``reps`` pairs of requests, n=1 then n at temperature 0.8 (the order alternating), each
on a prompt not seen before (no prefix cached from the other). ``ignore_eos`` is not an
OpenAI field, so each answer runs until it stops or reaches ``--tokens``; the report
gives the tokens next to the time. Prints one JSON line per request, then per engine the
median wall times, their ratio and whether the n answers were distinct. Writes
``bench/results/choices.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from backends.bundled import smollm2_path
from bench.servers import OPENVINO_MODEL, Config, kiln, kiln_openvino, running

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["a lighthouse", "a kettle", "autumn rain", "a lost key", "the night train", "a garden snail",
          "an old map", "a paper boat", "the first snow", "a quiet library", "a broken clock",
          "a river stone", "a city at dawn", "a violin", "a desert well", "a spider's web"]


def ask(client: httpx.Client, url: str, model: str, n: int, topic: str, tokens: int, seed: int) -> dict[str, Any]:
    body = {"model": model, "n": n, "temperature": 0.8, "max_tokens": tokens, "seed": seed,
            "messages": [{"role": "user", "content": f"Write a short poem about {topic}."}]}
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    d = r.json()
    texts = [c["message"]["content"] for c in d["choices"]]
    return {"n": n, "wall_s": round(wall, 3), "completion_tokens": d["usage"]["completion_tokens"],
            "prompt_tokens": d["usage"]["prompt_tokens"], "distinct": len(set(texts)), "topic": topic}


def bench(url: str, model: str, a: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with httpx.Client(timeout=600) as client:
        ask(client, url, model, a.n, "warming up", 8, 0)  # load, and the first decode's setup
        for rep in range(a.reps):
            order = (1, a.n) if rep % 2 == 0 else (a.n, 1)
            for k, n in enumerate(order):
                row = ask(client, url, model, n, TOPICS[(2 * rep + k) % len(TOPICS)], a.tokens, 1000 + rep)
                rows.append(row)
                print(json.dumps(row), flush=True)
    one = [r["wall_s"] for r in rows if r["n"] == 1]
    many = [r["wall_s"] for r in rows if r["n"] == a.n]
    return {"rows": rows, "median_n1_s": statistics.median(one), f"median_n{a.n}_s": statistics.median(many),
            "ratio": round(statistics.median(many) / statistics.median(one), 2),
            "tokens_n1": statistics.median(r["completion_tokens"] for r in rows if r["n"] == 1),
            f"tokens_n{a.n}": statistics.median(r["completion_tokens"] for r in rows if r["n"] == a.n),
            "all_distinct": all(r["distinct"] == a.n for r in rows if r["n"] == a.n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--engines", default="llamacpp,openvino-cpu")
    ap.add_argument("--kiln-threads", type=int, default=0, help="KILN_THREADS (0: kiln's default)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kiln-bench" / "choices")
    a = ap.parse_args()
    cfg = Config(gguf=smollm2_path(), threads=2, kiln_threads=a.kiln_threads, parallel=a.n, ctx_per_seq=2048, work_dir=a.work)
    logs = a.work / "logs"
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
                                       "python": platform.python_version()},
                           "command": "python -m bench.choices " + " ".join(
                               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "work")}
    for engine in a.engines.split(","):
        target, model = ((kiln(cfg), "smollm2:135m") if engine == "llamacpp"
                         else (kiln_openvino(cfg, logs), OPENVINO_MODEL))
        with running(target, logs) as srv:
            print(f"== {engine}", flush=True)
            out[engine] = bench(srv.url, model, a)
    out["machine"]["load_avg_end"] = os.getloadavg()
    for engine in a.engines.split(","):
        r = out[engine]
        print(f"{engine}: n=1 {r['median_n1_s']:.2f} s ({r['tokens_n1']} tokens), n={a.n} "
              f"{r[f'median_n{a.n}_s']:.2f} s ({r[f'tokens_n{a.n}']} tokens in all): {r['ratio']}x; "
              f"distinct answers every time: {r['all_distinct']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "choices.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
