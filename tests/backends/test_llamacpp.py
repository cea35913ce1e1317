"""The llama.cpp engine on the bundled SmolLM2-135M-Instruct (real model, CPU).

Outputs are checked against each request's own options, never against fixed
texts from other runs: batched logits are not bit-identical to unbatched ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from tests.models import real_import

L = real_import("llama_cpp")

from backends.base import (  # noqa: E402
    Chunk,
    FinishReason,
    GenerationRequest,
    InProcessBackend,
    InvalidRequest,
    ModelSpec,
    SamplingParams,
)
from backends.gguf import GGUFError  # noqa: E402
from backends.llamacpp import LlamaCppEngine  # noqa: E402
from tests.models import chat, model_path  # noqa: E402

pytestmark = pytest.mark.real_model

NUM_CTX = 2048


@pytest.fixture(scope="module")
def backend():
    b = InProcessBackend(LlamaCppEngine, ModelSpec(name="smollm2", path=model_path(),
                                                   num_ctx=NUM_CTX, num_parallel=4))
    asyncio.run(b.load())
    yield b
    asyncio.run(b.unload())


async def _collect(b: InProcessBackend, req: GenerationRequest) -> tuple[str, list[Chunk]]:
    chunks = [c async for c in b.stream(req)]
    return "".join(c.text for c in chunks), chunks


def generate(b: InProcessBackend, prompt: str, schema: dict | None = None,
             **sampling) -> tuple[str, list[Chunk]]:
    req = GenerationRequest(prompt=prompt, json_schema=schema, sampling=SamplingParams(**sampling))
    return asyncio.run(_collect(b, req))


def check_stream(chunks: list[Chunk]) -> Chunk:
    """Only the last chunk finishes; token counts add up to the usage."""
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason is not None and last.usage is not None
    assert sum(c.n_tokens for c in chunks) == last.usage.completion_tokens
    return last


def run_engine(engine: LlamaCppEngine, req: GenerationRequest) -> list[Chunk]:
    """Drives an engine directly (no event loop) and returns its chunks."""
    chunks: list[Chunk] = []
    done = threading.Event()

    def emit(c: Chunk) -> None:
        chunks.append(c)
        if c.finish_reason is not None:
            done.set()

    engine.submit(req, emit)
    assert done.wait(300)
    return chunks


def wait_idle(b: InProcessBackend, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while b.engine.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.engine.stats()["active"] == 0


def test_chat_prompt_generates_text_and_usage(backend):
    prompt = chat("What is the capital of France?")
    text, chunks = generate(backend, prompt, temperature=0, max_tokens=40)
    last = check_stream(chunks)
    assert text.strip()
    assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    u = last.usage
    assert u.prompt_tokens == len(backend.engine.tokenize(prompt))
    assert 0 < u.completion_tokens <= 40
    assert u.prompt_ns > 0 and u.eval_ns >= 0
    assert isinstance(u.prompt_ns, int) and isinstance(u.eval_ns, int)


def test_info_and_tokenize(backend):
    info = backend.engine.info().public()
    assert info["device"] == "cpu" and info["num_ctx"] == NUM_CTX and info["num_parallel"] == 4
    assert info["kv_bytes"] > 0 and info["model_bytes"] > 0 and info["n_threads"] > 0
    assert isinstance(info["system_info"], str) and info["system_info"]
    toks = backend.engine.tokenize("<|im_start|>user\nhi")
    assert toks[0] == 1  # <|im_start|> parsed as one special token
    long = backend.engine.tokenize("word " * 5000)  # larger than any first guess of a buffer
    assert len(long) >= 5000


def test_max_tokens_gives_length(backend):
    text, chunks = generate(backend, chat("Write a long story about a dragon."),
                            temperature=0, max_tokens=5)
    last = check_stream(chunks)
    assert last.finish_reason == FinishReason.LENGTH
    assert last.usage.completion_tokens == 5
    assert text


def test_stop_string_cuts_before_it(backend):
    prompt = chat("Name three colors.")
    full, full_chunks = generate(backend, prompt, temperature=0, max_tokens=60)
    # Pick a stop string from this run's own greedy output, past its first token.
    words = [w for w in full.split() if len(w) > 2 and full.find(w) > 3]
    assert words, f"no usable word in {full!r}"
    stop = words[0]
    text, chunks = generate(backend, prompt, temperature=0, max_tokens=60, stop=[stop])
    last = check_stream(chunks)
    assert last.finish_reason == FinishReason.STOP
    assert stop not in text
    assert text == full[: full.index(stop)]
    assert last.usage.completion_tokens < check_stream(full_chunks).usage.completion_tokens


def test_greedy_is_reproducible(backend):
    prompt = chat("Tell me about dogs.")
    a, ca = generate(backend, prompt, temperature=0, max_tokens=30)
    b, cb = generate(backend, prompt, temperature=0, max_tokens=30)
    assert a and a == b
    assert cb[-1].usage.cached_tokens > 0  # the second run reused the first one's KV


def test_same_seed_same_text(backend):
    prompt = chat("Tell me a story.")
    a, _ = generate(backend, prompt, temperature=0.8, seed=1234, max_tokens=30)
    b, _ = generate(backend, prompt, temperature=0.8, seed=1234, max_tokens=30)
    assert a and a == b


def test_concurrent_requests_keep_their_own_options(backend):
    before = backend.engine.stats()["decode_calls"]
    reqs = [
        GenerationRequest(prompt=chat("Write a long story about a cat."),
                          sampling=SamplingParams(temperature=0, max_tokens=3)),
        GenerationRequest(prompt=chat("Write a long story about a dog."),
                          sampling=SamplingParams(temperature=0, max_tokens=20)),
        GenerationRequest(prompt=chat("Name three colors, one per line."),
                          sampling=SamplingParams(temperature=0, max_tokens=40, stop=["\n"])),
        GenerationRequest(prompt=chat("Tell me a story about a fish."),
                          sampling=SamplingParams(temperature=0.8, seed=7, max_tokens=10)),
    ]

    async def run_all():
        return await asyncio.gather(*(_collect(backend, r) for r in reqs))

    results = asyncio.run(run_all())
    lasts = [check_stream(chunks) for _, chunks in results]
    for req, last in zip(reqs, lasts):
        assert last.usage.prompt_tokens == len(backend.engine.tokenize(req.prompt))
        assert last.usage.completion_tokens <= req.sampling.max_tokens
    assert lasts[0].finish_reason == FinishReason.LENGTH and lasts[0].usage.completion_tokens == 3
    assert lasts[1].usage.completion_tokens <= 20
    assert "\n" not in results[2][0]
    assert lasts[3].usage.completion_tokens <= 10
    # They ran in the same batches: fewer decode calls than tokens generated.
    total = sum(last.usage.completion_tokens for last in lasts)
    assert backend.engine.stats()["decode_calls"] - before < total
    wait_idle(backend)


def test_cancel_mid_stream_frees_the_slot(backend):
    async def cancel_after_three():
        req = GenerationRequest(prompt=chat("Write a very long story about the sea."),
                                sampling=SamplingParams(temperature=0.8, max_tokens=500))
        agen = backend.stream(req)
        chunks = []
        async for c in agen:
            chunks.append(c)
            if len(chunks) == 3:
                break
        await agen.aclose()
        return chunks

    chunks = asyncio.run(cancel_after_three())
    assert len(chunks) == 3 and all(c.finish_reason is None for c in chunks)
    wait_idle(backend)
    text, chunks = generate(backend, chat("Say hello."), temperature=0, max_tokens=10)
    assert check_stream(chunks).finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def test_waiting_requests_are_fifo_and_cancellable(backend):
    engine = backend.engine
    finals: dict[str, Chunk] = {}
    order: list[str] = []
    all_done = threading.Event()

    def emitter(rid: str):
        def emit(c: Chunk) -> None:
            if c.finish_reason is not None:
                finals[rid] = c
                order.append(rid)
                if len(finals) == 7:
                    all_done.set()
        return emit

    def req(text: str, max_tokens: int) -> GenerationRequest:
        return GenerationRequest(prompt=chat(text),
                                 sampling=SamplingParams(temperature=0, max_tokens=max_tokens))

    blockers = [req(f"Count from 1 to 100, list {i}.", 20) for i in range(4)]  # fill 4 slots
    w1, w2, w3 = (req("Say hi.", 1) for _ in range(3))
    for r in [*blockers, w1, w2, w3]:
        engine.submit(r, emitter(r.id))
    engine.cancel(w2.id)  # waiting: dropped without ever taking a slot
    engine.cancel(blockers[0].id)  # running (or just admitted)
    assert all_done.wait(300)
    assert finals[w2.id].finish_reason == FinishReason.CANCELLED
    assert finals[w2.id].usage.completion_tokens == 0
    assert finals[blockers[0].id].finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH)
    for r in [w1, w3]:
        assert finals[r.id].finish_reason == FinishReason.LENGTH
        assert finals[r.id].usage.completion_tokens == 1
    # w1 and w3 only got a slot once a blocker had left, and in submission order.
    first_blocker_done = min(order.index(b.id) for b in blockers)
    assert first_blocker_done < order.index(w1.id) < order.index(w3.id)
    engine.cancel(w1.id)  # already finished: a no-op
    s = engine.stats()
    assert s["active"] == 0 and s["waiting"] == 0


def test_prefix_reuse_reports_cached_tokens(backend):
    system = " ".join(f"Rule {i}: be kind, be brief and be accurate." for i in range(30))
    p1 = chat("What is a cat?", system)
    p2 = chat("What is a dog?", system)
    n_sys = len(backend.engine.tokenize(chat("", system)[: -len("<|im_start|>assistant\n")]))
    assert n_sys > 300
    before = backend.engine.stats()["cached_tokens_total"]
    _, c1 = generate(backend, p1, temperature=0, max_tokens=5)
    _, c2 = generate(backend, p2, temperature=0, max_tokens=5)
    u1, u2 = c1[-1].usage, c2[-1].usage
    assert u2.prompt_tokens == len(backend.engine.tokenize(p2))
    assert u1.prompt_tokens == len(backend.engine.tokenize(p1))
    assert u2.cached_tokens >= n_sys - 5
    assert u2.cached_tokens < u2.prompt_tokens
    assert backend.engine.stats()["cached_tokens_total"] - before >= u2.cached_tokens


def test_prompt_longer_than_context_is_an_error(backend):
    text, chunks = generate(backend, "word " * (NUM_CTX + 100), temperature=0)
    last = check_stream(chunks)
    assert last.finish_reason == FinishReason.ERROR
    assert "num_ctx" in last.detail and str(NUM_CTX) in last.detail
    assert text == ""


def test_empty_prompt_is_an_error(backend):
    _, chunks = generate(backend, "", temperature=0)
    assert chunks[-1].finish_reason == FinishReason.ERROR and chunks[-1].detail


def test_embeddings(backend):
    emb = asyncio.run(backend.embed(["hello world", "a text about cats and dogs"]))
    assert len(emb.vectors) == 2
    assert all(len(v) == 576 for v in emb.vectors)
    assert all(isinstance(x, float) for x in emb.vectors[0])
    assert emb.vectors[0] != emb.vectors[1]
    assert emb.prompt_tokens == sum(len(backend.engine.tokenize(t))
                                    for t in ["hello world", "a text about cats and dogs"])
    with pytest.raises(InvalidRequest):
        asyncio.run(backend.embed(["word " * (NUM_CTX + 10)]))


def test_grammar_constrains_output(backend):
    for seed in (1, 2, 3):
        text, chunks = generate(backend, chat("Is the sky blue?"), schema={"enum": ["yes", "no"]},
                                temperature=0.8, seed=seed, max_tokens=20)
        assert check_stream(chunks).finish_reason == FinishReason.STOP
        assert text in ('"yes"', '"no"')


def test_invalid_grammar_is_an_error(backend):
    _, chunks = generate(backend, chat("Hi"), schema={"type": "string", "pattern": "x"}, temperature=0)
    last = check_stream(chunks)
    assert last.finish_reason == FinishReason.ERROR and "schema" in last.detail
    wait_idle(backend)


def test_utf8_comes_out_whole(backend):
    seen_non_ascii = False
    for q in ("Write the word café three times.", "Write three emojis."):
        text, chunks = generate(backend, chat(q), temperature=0, max_tokens=60)
        check_stream(chunks)
        assert all(isinstance(c.text, str) and "\ufffd" not in c.text for c in chunks)
        seen_non_ascii |= any(ord(ch) > 127 for ch in text)
    assert seen_non_ascii


def test_context_full_ends_with_length():
    spec = ModelSpec(name="smollm2", path=model_path(), num_ctx=256, num_parallel=1)
    engine = LlamaCppEngine(spec)
    try:
        prompt = "hello " * 200
        n_prompt = len(engine.tokenize(prompt))
        # A string longer than the context: the model cannot end the text itself.
        chunks = run_engine(engine, GenerationRequest(prompt=prompt, json_schema={"type": "string", "minLength": 4096},
                                                      sampling=SamplingParams(temperature=0)))
        last = check_stream(chunks)
        assert last.finish_reason == FinishReason.LENGTH
        assert last.detail == "context window full (num_ctx=256)"
        # Every cell is used; the last token is sampled but never needs one.
        assert n_prompt + last.usage.completion_tokens == 256 + 1
    finally:
        engine.close()
        engine.close()  # idempotent


def test_batch_is_laid_out_in_slot_order(backend):
    """llama.cpp splits a batch over per-sequence KV caches into ubatches of
    consecutive sequence ids: admission order (here slots 2, 0, 3, 1) would cost one
    graph evaluation per sequence. Decode tokens and prompt chunks alike go in slot
    order; only decode tokens and a prompt's last token ask for logits."""
    from backends.llamacpp import _Entry, _Seq

    engine = backend.engine  # idle between tests: the batch is free to fill here
    seqs = []
    for slot, n_prompt, n_past in [(2, 5, 5), (0, 6, 6), (3, 40, 0), (1, 8, 3)]:
        e = _Entry(GenerationRequest(prompt="x"), lambda c: None)
        e.tokens = list(range(100, 100 + n_prompt))
        s = _Seq(e, slot, n_past, None)
        if n_past == n_prompt:
            s.tokens.append(7)  # generating: its last sampled token is fed back
        seqs.append(s)
    gen = [s for s in seqs if s.n_past >= s.n_prompt]
    pre = [s for s in seqs if s.n_past < s.n_prompt]
    rows = engine._fill(gen, pre, budget=20)
    b = engine.batch
    ids = [b.seq_id[i][0] for i in range(b.n_tokens)]
    assert ids == sorted(ids) and set(ids) == {0, 2, 3}
    added = {s.slot: k for s, k, _ in rows}
    # Both decode tokens go in; the budget of 20 goes to prompts in admission order.
    assert added == {2: 1, 0: 1, 3: 20}  # slot 1's prompt waits for the next step
    logits = [i for i in range(b.n_tokens) if b.logits[i]]
    assert [ids[i] for i in logits] == [0, 2]  # slot 3's prompt is not done yet
    assert {s.slot: i for s, _, i in rows if i >= 0} == {0: logits[0], 2: logits[1]}


def test_decode_failures_end_the_request_not_the_engine(monkeypatch):
    engine = LlamaCppEngine(ModelSpec(name="smollm2", path=model_path(), num_ctx=256,
                                      num_parallel=2))
    try:
        real = L.llama_decode
        req = lambda: GenerationRequest(prompt=chat("Say hi."),  # noqa: E731
                                        sampling=SamplingParams(temperature=0, max_tokens=5))
        sizes: list[int] = []

        def no_kv_slot(ctx, batch):
            sizes.append(batch.n_tokens)
            return 1

        monkeypatch.setattr(L, "llama_decode", no_kv_slot)
        last = check_stream(run_engine(engine, req()))
        assert last.finish_reason == FinishReason.ERROR and "KV" in last.detail
        # The prompt chunk was halved down to one token, then the sequence given up.
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 1 and len(sizes) < 12

        monkeypatch.setattr(L, "llama_decode", lambda ctx, batch: -3)
        last = check_stream(run_engine(engine, req()))
        assert last.finish_reason == FinishReason.ERROR and "-3" in last.detail

        monkeypatch.setattr(L, "llama_decode", real)
        last = check_stream(run_engine(engine, req()))
        assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert last.usage.cached_tokens == 0  # the failed sequences' KV was dropped
        assert engine.stats()["active"] == 0
    finally:
        engine.close()


def test_num_ctx_above_trained_context_is_capped(caplog):
    spec = ModelSpec(name="smollm2", path=model_path(), num_ctx=1 << 20, num_parallel=1,
                     num_batch=64)
    with caplog.at_level(logging.WARNING, logger="kiln.llamacpp"):
        engine = LlamaCppEngine(spec)
    try:
        assert engine.info().num_ctx == 8192
        assert any("trained context" in r.getMessage() for r in caplog.records)
    finally:
        engine.close()


def test_malformed_file_raises_gguf_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(GGUFError):
        LlamaCppEngine(ModelSpec(name="bad", path=str(bad)))


def test_detokenize_gives_back_text_that_tokenizes_to_the_same_ids(backend):
    """/api/generate's context: ids back to text (special tokens written out), which the
    next prompt tokenizes to the same ids."""
    text = chat("Hello there, how are you?") + "I am fine. Ünïcödé ✓"
    ids = asyncio.run(backend.tokenize(text))
    back = asyncio.run(backend.detokenize(ids))
    assert back == text
    assert asyncio.run(backend.tokenize(back)) == ids
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        asyncio.run(backend.detokenize([10**9]))


def test_q8_0_kv_cache_halves_the_memory_and_still_answers(backend):
    # KILN_KV_CACHE_TYPE=q8_0: llama.cpp's quantized cache (with flash attention, which a
    # quantized V needs); the gateway's budget counts the same bytes the engine reports.
    from server.scheduler import estimate_kv_bytes
    from server.models import manifest_from_gguf
    from backends.gguf import read_gguf
    from backends.store import FileRef

    b = InProcessBackend(LlamaCppEngine, ModelSpec(name="smollm2-q8", path=model_path(), num_ctx=NUM_CTX,
                                                   num_parallel=1, extra={"kv_cache_type": "q8_0"}))
    info = asyncio.run(b.load()).public()
    try:
        f16 = backend.engine.info().public()
        assert info["kv_cache_type"] == "q8_0" and f16["kv_cache_type"] == "f16"
        per_cell_q8 = info["kv_bytes"] / (info["num_ctx"] * info["num_parallel"])
        per_cell_f16 = f16["kv_bytes"] / (f16["num_ctx"] * f16["num_parallel"])
        assert per_cell_q8 == pytest.approx(per_cell_f16 * 34 / 64)
        m = manifest_from_gguf("x:1", read_gguf(model_path()), FileRef("model", model_path(), "0", 1), "test")
        assert estimate_kv_bytes(m, info["num_ctx"], 1, "q8_0") == pytest.approx(info["kv_bytes"], rel=0.01)
        prompt = chat("Count from one to five.")
        text, chunks = generate(b, prompt, temperature=0, max_tokens=16)
        check_stream(chunks)
        assert all(n in text for n in ("1", "2", "3")), text  # it counts
    finally:
        asyncio.run(b.unload())
