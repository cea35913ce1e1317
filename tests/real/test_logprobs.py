"""Log-probabilities and logit_bias on a real ``kiln serve`` (llama.cpp, the bundled
SmolLM2-135M), through the official openai and ollama clients. The values are the
engine's: the log-softmax over the whole vocabulary after logit_bias and the penalties."""

from __future__ import annotations

import json
import math

import httpx
import llama_cpp
import openai
import pytest

from tests.models import model_path

pytestmark = pytest.mark.real_model

MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def vocab():
    """The model's own tokenizer, to name token ids for logit_bias."""
    llm = llama_cpp.Llama(model_path=model_path(), vocab_only=True, verbose=False)
    yield lambda data: llm.tokenize(data, add_bos=False, special=True)
    llm.close()


def check_greedy(entries, text: str) -> None:
    assert entries, "no logprobs"
    for e in entries:
        assert e.logprob <= 0 and math.exp(e.logprob) <= 1
        tops = e.top_logprobs
        assert tops and tops[0].token == e.token and tops[0].logprob == pytest.approx(e.logprob, abs=1e-6)
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert all(math.exp(t.logprob) <= 1 for t in tops)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    assert "".join(e.token for e in entries) == text


def test_chat_logprobs_greedy(oa):
    r = oa.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=12, logprobs=True,
                                   top_logprobs=5)
    check_greedy(r.choices[0].logprobs.content, r.choices[0].message.content)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens


def test_chat_logprobs_streamed_per_delta(oa):
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    whole = oa.chat.completions.create(**kw).choices[0]
    entries, text = [], ""
    for ev in oa.chat.completions.create(**kw, stream=True):
        ch = ev.choices[0] if ev.choices else None
        if ch is not None and ch.delta.content:
            assert ch.logprobs is not None
            assert "".join(e.token for e in ch.logprobs.content) == ch.delta.content
            entries += ch.logprobs.content
            text += ch.delta.content
    assert text == whole.message.content
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [
        (e.token, round(e.logprob, 4)) for e in whole.logprobs.content]


def test_sampled_logprobs_are_after_penalties(oa):
    """A repeat penalty changes the reported values: they are taken after it."""
    base = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=6, logprobs=True)
    plain = oa.chat.completions.create(**base).choices[0].logprobs.content
    penal = oa.chat.completions.create(**base, extra_body={"options": {"repeat_penalty": 1.5}}).choices[0]
    assert plain[0].logprob != pytest.approx(penal.logprobs.content[0].logprob, abs=1e-6)


def test_completions_logprobs_and_echo(oa):
    r = oa.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6,
                              logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs)
    for tok, x, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):  # greedy: the top one
        assert max(top.values()) == pytest.approx(x, abs=1e-6) and top[tok] == pytest.approx(x, abs=1e-6)
    assert lp.text_offset[0] == 0
    e = oa.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6,
                              echo=True)
    assert e.choices[0].text == "The capital of France is" + r.choices[0].text


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_ollama_logprobs(server, path):
    body = {"model": MODEL, "stream": False, "logprobs": True, "top_logprobs": 3,
            "options": {"temperature": 0, "num_predict": 8}}
    body |= {"messages": ASK} if path == "/api/chat" else {"prompt": ASK[0]["content"]}
    r = httpx.post(server.url + path, json=body, timeout=300).json()
    text = r["message"]["content"] if path == "/api/chat" else r["response"]
    assert "".join(e["token"] for e in r["logprobs"]) == text
    for e in r["logprobs"]:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["top_logprobs"][0]["token"] == e["token"] and math.exp(e["logprob"]) <= 1
    lines = httpx.post(server.url + path, json={**body, "stream": True}, timeout=300).text.splitlines()
    streamed = [e for ln in lines if ln for e in json.loads(ln).get("logprobs", [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in r["logprobs"]]


def test_logit_bias_bans_and_forces(oa, vocab):
    base = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=4, logprobs=True)
    first = oa.chat.completions.create(**base).choices[0].logprobs.content[0]
    (banned,) = vocab(bytes(first.bytes))
    r = oa.chat.completions.create(**base, logit_bias={str(banned): -100}).choices[0]
    assert r.logprobs.content[0].token != first.token
    (forced,) = vocab(b"Paris")
    r = oa.chat.completions.create(**base, logit_bias={str(forced): 100}).choices[0]
    assert r.logprobs.content[0].token == "Paris"
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        oa.chat.completions.create(**base, logit_bias={"99999999": 5})
