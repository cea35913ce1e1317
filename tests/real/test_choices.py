"""``n`` > 1 on a real ``kiln serve`` (llama.cpp, 4 parallel sequences): the prompt is
evaluated once and its KV cache copied to the other sequences; each samples with its own
seed. Nothing here asserts a timing (bench: the README's figures)."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.real_model

MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600, max_retries=0)


def test_n4_distinct_answers_and_usage(oa):
    one = oa.chat.completions.create(model=MODEL, messages=ASK, temperature=0.8, max_tokens=24, seed=11)
    r = oa.chat.completions.create(model=MODEL, messages=ASK, temperature=0.8, max_tokens=24, n=4, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 4, texts
    assert texts[0] == one.choices[0].message.content  # choice 0 has the request's own seed
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once
    assert r.usage.completion_tokens > one.usage.completion_tokens


def test_n_streamed_with_index(oa):
    parts: dict[int, str] = {}
    finished = set()
    usage = None
    for ev in oa.chat.completions.create(model=MODEL, messages=ASK, temperature=0.8, max_tokens=16, n=3, seed=3,
                                         stream=True, stream_options={"include_usage": True}):
        if ev.usage is not None:
            usage = ev.usage
        for c in ev.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2} and all(parts[i] for i in range(3))
    assert usage is not None and usage.completion_tokens >= 3


def test_completions_n_and_too_many(oa):
    r = oa.completions.create(model=MODEL, prompt="Once upon a time", temperature=0.8, max_tokens=12, n=2, seed=1)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text != r.choices[1].text
    with pytest.raises(openai.BadRequestError, match="KILN_NUM_PARALLEL"):
        oa.completions.create(model=MODEL, prompt="x", max_tokens=2, n=5)
