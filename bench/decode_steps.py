"""llama.cpp alone: what one ``llama_decode`` of one token for each of k sequences costs
on this CPU, k = 1, 2, 4 (the step ``n`` choices take), without kiln.

    python -m bench.decode_steps [--threads 1] [--unified]

The bundled model, kiln's context layout (``n_seq_max`` 4, a KV stream per sequence
unless ``--unified``), a 40-token prompt evaluated once and copied to the other
sequences, then 64 steps per k, twice. Prints ms per step.
"""

from __future__ import annotations

import argparse
import os
import time

import llama_cpp as L

from backends.bundled import smollm2_path

N_SEQ = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unified", action="store_true", help="one KV stream for all sequences")
    a = ap.parse_args()
    L.llama_backend_init()
    model = L.llama_model_load_from_file(os.fsencode(str(smollm2_path())), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max, cp.n_batch, cp.n_ubatch = 2048 * N_SEQ, N_SEQ, 512, 512
    cp.n_threads = cp.n_threads_batch = a.threads
    cp.kv_unified = a.unified
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 1)

    def decode(items: list[tuple[int, int, int]]) -> None:  # (token, position, sequence)
        batch.n_tokens = len(items)
        for i, (tok, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, 1
            batch.seq_id[i][0] = seq
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    prompt = list(range(100, 140))
    decode([(t, i, 0) for i, t in enumerate(prompt)])
    for s in range(1, N_SEQ):
        L.llama_memory_seq_cp(mem, 0, s, -1, -1)
    for k in (1, 2, 4, 1, 2, 4):
        for s in range(N_SEQ):
            L.llama_memory_seq_rm(mem, s, len(prompt), -1)
        t0 = time.perf_counter()
        for step in range(64):
            decode([(200 + step, len(prompt) + step, s) for s in range(k)])
        ms = (time.perf_counter() - t0) / 64 * 1e3
        print(f"threads={a.threads} unified={a.unified} sequences={k}: {ms:.1f} ms/step", flush=True)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
