"""llama.cpp tokenization is bounded: text dense with special tokens tokenizes in
pieces (the same tokens as whole, in linear time rather than quadratic), stops past
the context, and stops when its request is cancelled (real engine, bundled model)."""

from __future__ import annotations

import random
import time

import pytest

from tests.models import real_import

real_import("llama_cpp")

from backends.base import GenerationRequest, ModelSpec, SamplingParams  # noqa: E402
from backends.llamacpp import LlamaCppEngine, _Cancelled, _Entry  # noqa: E402
from tests.models import model_path  # noqa: E402

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def engine():
    e = LlamaCppEngine(ModelSpec(name="smollm2", path=model_path(), num_ctx=2048, num_parallel=1))
    yield e
    e.close()


WORDS = ["hello", " world", "<|im_start|>", "<|im_end|>", "\n", " ", "  ", "user", "assistant", "<|endoftext|>",
         "é", "日本語", "<", "|", "im_start", "<|im_start", "|>", "\t", "def f(x):", " <|im_end|>", "<|im_end|> ",
         "<repo_name>", "<reponame>", "\n\n", "123", "🙂"]


def test_pieces_give_the_tokens_of_the_whole(engine):
    rng = random.Random(7)
    for trial in range(12):
        text = "".join(rng.choice(WORDS) for _ in range(rng.randint(6000, 16000)))
        pieces = engine._splitter.pieces(text)
        assert len(pieces) > 1 and "".join(pieces) == text
        assert engine.tokenize(text) == engine._tokenize(text), trial


def test_special_dense_text_is_linear(engine):
    """Whole, 20,000 special tokens took 1.3 s here and 100,000 about 30 s (quadratic)."""
    t0 = time.monotonic()
    ids = engine.tokenize("<|im_start|>" * 100_000)
    took = time.monotonic() - t0
    assert ids == [1] * 100_000
    assert took < 10, took


def test_tokenizing_stops_past_the_limit(engine):
    t0 = time.monotonic()
    ids = engine.tokenize("<|im_start|>" * 100_000, limit=2048)
    assert 2048 < len(ids) < 2048 + 3000  # one piece past the limit at most
    assert time.monotonic() - t0 < 2


def test_a_cancelled_request_stops_tokenizing(engine):
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(_Cancelled):
        engine.tokenize("<|im_start|>" * 100_000, cancelled=cancelled)
    assert len(calls) == 3


def test_the_engine_refuses_what_cannot_fit_untokenized(engine):
    """The bytes alone show it: more than num_ctx tokens of the longest token text."""
    assert engine.max_token_bytes and engine.max_token_bytes >= 16
    text = "<|im_start|>" * (2048 * engine.max_token_bytes // 12 + 10)
    chunks = []
    e = _Entry(GenerationRequest(prompt=text, sampling=SamplingParams()), chunks.append)
    with engine._cond:
        engine._waiting.append(e)
    t0 = time.monotonic()
    engine._check(e)
    assert time.monotonic() - t0 < 1
    assert e.tokens is None
    assert chunks and "bytes, more than the context window of 2048 tokens" in chunks[0].detail
