"""Token-id inputs on a real ``kiln serve`` (llama.cpp, the bundled SmolLM2-135M): a
``/v1/completions`` prompt and a ``/v1/embeddings`` input given as the ids of a text
answer exactly as the text does; ids outside the vocabulary are a 400 naming the id, and
the server goes on serving."""

from __future__ import annotations

import httpx
import llama_cpp
import openai
import pytest

from tests.models import model_path

pytestmark = pytest.mark.real_model

MODEL = "smollm2:135m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def tok():
    """The model's own tokenizer, as the engine runs it on a prompt (BOS where the model
    adds one, special tokens parsed)."""
    llm = llama_cpp.Llama(model_path=model_path(), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def ids(tok, text: str) -> list[int]:
    return tok.tokenize(text.encode(), add_bos=True, special=True)


def test_greedy_completion_of_ids_equals_that_of_the_text(oa, tok):
    kw = dict(model=MODEL, temperature=0, max_tokens=12, logprobs=1)
    text = oa.completions.create(prompt=PROMPT, **kw)
    p = ids(tok, PROMPT)
    for prompt in (p, [p]):
        r = oa.completions.create(prompt=prompt, **kw)
        assert r.choices[0].text == text.choices[0].text and r.choices[0].text.strip()
        assert r.usage.prompt_tokens == text.usage.prompt_tokens == len(p)
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(text.choices[0].logprobs.token_logprobs,
                                                                     abs=1e-5)
    streamed = "".join(c.choices[0].text for c in oa.completions.create(prompt=p, stream=True, **kw)
                       if c.choices)
    assert streamed == text.choices[0].text


def test_ids_the_text_cannot_give(oa, tok):
    """Ids no text tokenizes to (the end-of-text token mid-prompt) reach the engine as they
    are: the answer differs from that of the text around them."""
    eos = tok.token_eos()
    p = ids(tok, PROMPT)
    plain = oa.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=8)
    r = oa.completions.create(model=MODEL, prompt=[eos, *p], temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens == len(p) + 1
    assert r.choices[0].text != plain.choices[0].text or r.usage.prompt_tokens != plain.usage.prompt_tokens


@pytest.mark.parametrize("bad", [-1, "n_vocab", 10**9])
def test_ids_outside_the_vocabulary_are_a_400_and_the_server_goes_on(oa, tok, server, bad):
    n_vocab = tok.n_vocab()
    bad = n_vocab if bad == "n_vocab" else bad
    prompt = [*ids(tok, PROMPT), bad]
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4},
                   timeout=300)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert f"token id {bad} " in err["message"] and f"0..{n_vocab - 1}" in err["message"], err
    with pytest.raises(openai.BadRequestError, match=f"token id {bad} "):
        oa.embeddings.create(model=MODEL, input=[prompt])
    after = oa.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4)
    assert after.choices[0].text.strip()


def test_embeddings_of_ids_equal_those_of_the_text(oa, tok):
    texts = ["The sky is blue because of Rayleigh scattering.", "Grass is green."]
    by_text = oa.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    one = oa.embeddings.create(model=MODEL, input=ids(tok, texts[0]), encoding_format="float")
    assert one.data[0].embedding == pytest.approx(by_text.data[0].embedding, abs=1e-5)
    both = oa.embeddings.create(model=MODEL, input=[ids(tok, t) for t in texts], encoding_format="float")
    assert [d.index for d in both.data] == [0, 1]
    for a, b in zip(both.data, by_text.data):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-5)
    assert both.usage.prompt_tokens == by_text.usage.prompt_tokens


def test_mixed_prompts_are_refused_by_name(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [12, "text"]}, timeout=60)
    assert r.status_code == 400 and "mixing token ids and strings" in r.json()["error"]["message"], r.text


def test_several_prompts_each_answer_as_alone(oa, tok):
    """A list of prompts (text and ids): one choice each, in order, greedy answers equal to
    each prompt's own; streamed, each index gets its own text; usage is the sum."""
    prompts = ["The capital of France is", ids(tok, "Water boils at"), "1, 2, 3,"]
    kw = dict(model=MODEL, temperature=0, max_tokens=10)
    alone = [oa.completions.create(prompt=p, **kw) for p in prompts]
    both = oa.completions.create(prompt=prompts, **kw)
    assert [c.index for c in both.choices] == [0, 1, 2]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in both.choices}) == 3
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed: dict[int, str] = {}
    for chunk in oa.completions.create(prompt=prompts, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [a.choices[0].text for a in alone]
