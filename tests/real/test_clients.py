"""The official clients against a real ``kiln serve`` on the bundled SmolLM2-135M (or, with
``KILN_CONFORMANCE_MODEL=gemma3``, Gemma 3 270M).

Driven exactly as users drive them: ``ollama.Client(host=...)`` and
``openai.OpenAI(base_url=.../v1)``. Every generation is bounded (the model at
temperature 0 often loops until its limit) and nothing here asserts a timing:
the machine is shared. Outputs are checked against each request's own options,
or against another run of the same request, never against texts from elsewhere.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import struct
import threading
import time
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.models import conformance_model

pytestmark = pytest.mark.real_model

REAL = conformance_model()
MODEL = REAL.name
EMBED_DIM = REAL.embedding_length
GREEDY = {"temperature": 0}
COUNT = [{"role": "user", "content": "Count from one to ten."}]


@pytest.fixture(scope="module")
def oc(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=180)


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=180)


def ps_entry(server, name: str = MODEL) -> dict[str, Any] | None:
    models = httpx.get(server.url + "/api/ps", timeout=30).json()["models"]
    return next((m for m in models if m["name"] == name), None)


def names(oc: ollama.Client) -> list[str]:
    return [m.model for m in oc.list().models]


# -- chat and generate --------------------------------------------------------------------

def test_chat_non_stream(oc):
    r = oc.chat(model=MODEL, messages=COUNT, options={**GREEDY, "num_predict": 8})
    assert r.done is True
    assert r.message.role == "assistant" and r.message.content.strip()
    assert r.model == MODEL
    assert 0 < r.eval_count <= 8 and r.prompt_eval_count > 0
    assert r.total_duration > 0 and r.eval_duration > 0
    assert r.done_reason in ("stop", "length")
    assert r.created_at is not None


def test_chat_stream(oc):
    parts = list(oc.chat(model=MODEL, messages=COUNT, stream=True, options={**GREEDY, "num_predict": 10}))
    assert len(parts) >= 3, parts
    *chunks, final = parts
    assert all(p.done is False for p in chunks)
    assert final.done is True
    assert final.eval_count is not None and 0 < final.eval_count <= 10
    assert final.prompt_eval_count and final.prompt_eval_count > 0
    assert final.done_reason in ("stop", "length")
    assert "".join(p.message.content for p in parts).strip()


def test_generate_non_stream_and_stream(oc):
    r = oc.generate(model=MODEL, prompt="Name a color.", options={**GREEDY, "num_predict": 6})
    assert r.done is True and r.response.strip()
    assert 0 < r.eval_count <= 6
    parts = list(oc.generate(model=MODEL, prompt="Name a color.", stream=True,
                             options={**GREEDY, "num_predict": 6}))
    assert len(parts) >= 2
    assert parts[-1].done is True and parts[-1].eval_count == r.eval_count
    assert all(p.done is False for p in parts[:-1])
    assert "".join(p.response for p in parts) == r.response  # greedy: the same text


def test_greedy_stream_equals_non_stream(oc, oa):
    opts = {**GREEDY, "num_predict": 8}
    whole = oc.chat(model=MODEL, messages=COUNT, options=opts).message.content
    streamed = "".join(p.message.content for p in oc.chat(model=MODEL, messages=COUNT, stream=True, options=opts))
    assert whole.strip() and whole == streamed

    r = oa.chat.completions.create(model=MODEL, messages=COUNT, temperature=0, max_tokens=8)
    text = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model=MODEL, messages=COUNT, temperature=0, max_tokens=8, stream=True) if c.choices)
    assert r.choices[0].message.content == text


def test_seed_makes_sampling_reproducible(oc):
    opts = {"seed": 42, "temperature": 0.8, "num_predict": 8}
    prompt = "Write one sentence about the sea."
    a = oc.generate(model=MODEL, prompt=prompt, options=opts).response
    b = oc.generate(model=MODEL, prompt=prompt, options=opts).response
    assert a.strip() and a == b


# -- stop and limits ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def free_count(oc) -> tuple[str, str]:
    """The greedy answer to COUNT without a stop string, and a stop string taken from its
    middle (engines differ in their greedy text; llama.cpp says '1. 1\n2. 2\n3. 3\n4')."""
    free = oc.chat(model=MODEL, messages=COUNT, options={**GREEDY, "num_predict": 14}).message.content
    # two characters from the second half whose first occurrence is not at the start
    stop = next((free[i:i + 2] for i in range(len(free) // 2, len(free) - 1)
                 if free[i:i + 2].strip() == free[i:i + 2] and free.index(free[i:i + 2]) > 0), None)
    assert stop, f"no usable stop string in {free!r}"
    return free, stop


def test_stop_ollama(oc, free_count):
    free_count, STOP_WORD = free_count
    r = oc.chat(model=MODEL, messages=COUNT, options={**GREEDY, "num_predict": 14, "stop": [STOP_WORD]})
    out = r.message.content
    assert out.strip() and STOP_WORD not in out
    assert out == free_count[: free_count.index(STOP_WORD)]  # cut right before it
    assert r.done_reason == "stop"

    parts = list(oc.chat(model=MODEL, messages=COUNT, stream=True,
                         options={**GREEDY, "num_predict": 14, "stop": [STOP_WORD]}))
    assert "".join(p.message.content for p in parts) == out
    assert all(STOP_WORD not in p.message.content for p in parts)
    assert parts[-1].done_reason == "stop"


def test_stop_openai(oa, free_count):
    free_count, STOP_WORD = free_count
    r = oa.chat.completions.create(model=MODEL, messages=COUNT, temperature=0, max_tokens=14, stop=STOP_WORD)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == free_count[: free_count.index(STOP_WORD)]


@pytest.mark.parametrize("n", [1, 5])
def test_num_predict_is_an_upper_bound(oc, n):
    r = oc.chat(model=MODEL, messages=COUNT, options={**GREEDY, "num_predict": n})
    assert r.eval_count == n  # the answer is much longer than n tokens
    assert r.done_reason == "length"
    g = oc.generate(model=MODEL, prompt="Count from one to ten.", options={**GREEDY, "num_predict": n})
    assert g.eval_count == n and g.done_reason == "length"


def test_max_tokens_openai(oa):
    r = oa.chat.completions.create(model=MODEL, messages=COUNT, temperature=0, max_tokens=4)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = oa.chat.completions.create(model=MODEL, messages=COUNT, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


# -- errors -------------------------------------------------------------------------------

def test_unknown_model(oc, oa):
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model="no-such-model:1b", messages=COUNT)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(oc.generate(model="no-such-model:1b", prompt="hi", stream=True))
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        oc.show("no-such-model:1b")
    assert e.value.status_code == 404
    with pytest.raises(openai.NotFoundError) as oe:
        oa.chat.completions.create(model="no-such-model:1b", messages=COUNT, max_tokens=4)
    assert "not found" in str(oe.value)
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("no-such-model:1b")


def test_malformed_json_then_a_good_request(server, oc):
    r = httpx.post(server.url + "/api/chat", content=b'{"model": "' + MODEL.encode() + b'", "messages": [', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{nope", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"]
    out = oc.chat(model=MODEL, messages=COUNT, options={**GREEDY, "num_predict": 4})
    assert out.done and out.message.content.strip()


# -- concurrency and cancellation -----------------------------------------------------------

def test_concurrent_requests_keep_their_own_output(server):
    # Raw repetition prompts: the model continues each with its own word.
    jobs = {"apple": 3, "river": 5, "seven": 7, "purple": 9}
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(word: str, n: int) -> None:
        try:
            client = ollama.Client(host=server.url, timeout=180)
            start.wait()
            results[word] = client.generate(model=MODEL, raw=True, prompt=", ".join([word] * 6) + ",",
                                            options={**GREEDY, "num_predict": n})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert set(results) == set(jobs)
    for word, n in jobs.items():
        r = results[word]
        assert r.done is True
        assert 0 < r.eval_count <= n, (word, r.eval_count)
        assert word in r.response, (word, r.response)
        assert not any(other in r.response for other in jobs if other != word), (word, r.response)


def test_ps_size_counts_the_kv_cache(server, oc):
    """``/api/ps`` size is the weights and the KV cache the engine allocated (OpenVINO's
    was once left out: its engine reported ``kv_cache_bytes``, the scheduler read ``kv_bytes``)."""
    backend = os.environ.get("KILN_CONFORMANCE_BACKEND", "llamacpp")
    if backend == "upstream":
        pytest.skip("an upstream's memory is its own")
    oc.generate(model=MODEL, prompt="Say hi.", options={**GREEDY, "num_predict": 1})
    entry = ps_entry(server)
    assert entry is not None
    kv, weights = entry["kiln"]["kv_bytes"], entry["kiln"].get("model_bytes") or 0
    print(f"\n/api/ps on {backend}: size {entry['size']} = weights {entry['size'] - kv} + KV cache {kv}")
    if backend != "openvino-npu":  # the NPU's static KV cache is not reported by OpenVINO
        assert kv > 0
    if weights:  # the engine knows its weights' size (llama.cpp); else the model's files count
        assert entry["size"] == weights + kv
    assert entry["size"] > kv


def test_disconnect_mid_stream_frees_the_slot(server, oc):
    body = {"model": MODEL, "prompt": "Write a very long story about a dragon.", "options": {"num_predict": 2000}}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with client.stream("POST", "/api/generate", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(3):
                assert next(lines)
            entry = ps_entry(server)
            assert entry is not None and entry["kiln"]["requests"] == 1  # it is running now
        # the response is closed: the server must stop generating
    deadline = time.monotonic() + 10
    while True:
        entry = ps_entry(server)
        if entry is not None and entry["kiln"]["requests"] == 0:
            break
        assert time.monotonic() < deadline, f"the generation is still running after the disconnect: {entry}"
        time.sleep(0.2)
    r = oc.generate(model=MODEL, prompt="Say hi.", options={**GREEDY, "num_predict": 4})
    assert r.done and 0 < r.eval_count <= 4


# -- model information through the client's own models ---------------------------------

def test_show_list_ps(oc):
    oc.generate(model=MODEL, prompt="hi", options={"num_predict": 1})
    s = oc.show(MODEL)
    assert s.modelinfo is not None
    arch = s.modelinfo["general.architecture"]
    assert s.modelinfo[f"{arch}.context_length"] > 0
    assert s.modelinfo[f"{arch}.embedding_length"] == EMBED_DIM
    assert "completion" in s.capabilities
    assert s.details.family == REAL.family and s.details.format in ("gguf", "openvino")
    assert s.template and isinstance(s.parameters, str) and s.modified_at is not None

    listed = {m.model: m for m in oc.list().models}
    m = listed[MODEL]
    assert m.size > 0 and len(m.digest) == 64 and m.modified_at is not None
    assert m.details.parameter_size and m.details.quantization_level

    running = {p.model: p for p in oc.ps().models}
    p = running[MODEL]
    assert p.expires_at is not None and p.expires_at.tzinfo is not None
    assert p.expires_at > dt.datetime.now(dt.timezone.utc)
    assert p.size_vram is not None and p.context_length and p.context_length > 0
    assert p.digest == m.digest


def test_openai_models(oa):
    ids = [m.id for m in oa.models.list()]
    assert MODEL in ids
    m = oa.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model" and m.owned_by


# -- embeddings and completions ----------------------------------------------------------

def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_embeddings_both_clients(oc, oa, server):
    text = "The sky is blue because of Rayleigh scattering."
    native = oc.embed(model=MODEL, input=text).embeddings
    assert len(native) == 1 and len(native[0]) == EMBED_DIM
    assert sum(x * x for x in native[0]) == pytest.approx(1.0, abs=1e-4)

    two = oc.embed(model=MODEL, input=[text, "Grass is green."]).embeddings
    # A list is one batch for the engine, whose kernels for several sequences round
    # differently from those for one: Gemma 3 on llama.cpp differed by up to 2.5e-4 per
    # element (cosine 0.99999+), SmolLM2 by less than 1e-5. The same vector, not the same bits.
    assert len(two) == 2 and _cosine(two[0], native[0]) > 0.9999
    assert _cosine(two[1], native[0]) < 0.99  # and the other text's is another vector

    via_openai = oa.embeddings.create(model=MODEL, input=text)  # the SDK asks for base64 and decodes it
    vec = via_openai.data[0].embedding
    assert len(vec) == EMBED_DIM
    assert vec == pytest.approx(native[0], abs=1e-5)
    assert via_openai.usage.prompt_tokens > 0

    # what the SDK received on the wire: little-endian float32 in base64
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": text, "encoding_format": "base64"},
                     timeout=60).json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{EMBED_DIM}f", base64.b64decode(raw))
    assert list(decoded) == pytest.approx(native[0], abs=1e-5)


def test_openai_completions(oa):
    r = oa.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens <= 5
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(oa.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                        temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_openai_stream_include_usage(oa):
    chunks = list(oa.chat.completions.create(model=MODEL, messages=COUNT, temperature=0, max_tokens=6, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


# -- model management ----------------------------------------------------------------------

def test_create_chat_delete(oc):
    r = oc.create(model="mine", from_=MODEL, system="You are a pirate. Answer like a pirate.")
    assert r.status == "success"
    assert "mine:latest" in names(oc)
    assert oc.show("mine").modelfile and "pirate" in (oc.show("mine").modelfile or "")
    out = oc.chat(model="mine", messages=[{"role": "user", "content": "Who are you?"}],
                  options={**GREEDY, "num_predict": 8})
    assert out.done and out.message.content.strip()
    assert out.model == "mine"
    assert oc.delete("mine").status == "success"
    assert "mine:latest" not in names(oc)
    with pytest.raises(ollama.ResponseError) as e:
        oc.delete("mine")
    assert e.value.status_code == 404


def test_copy(oc):
    assert oc.copy(MODEL, "smollm2-copy:v1").status == "success"
    try:
        assert "smollm2-copy:v1" in names(oc)
        # the same model under another name (generating with it would load a second worker)
        copy, orig = oc.show("smollm2-copy:v1"), oc.show(MODEL)
        assert copy.template == orig.template and copy.details == orig.details
    finally:
        oc.delete("smollm2-copy:v1")
    assert MODEL in names(oc)
    with pytest.raises(ollama.ResponseError) as e:
        oc.copy("no-such-model:1b", "x:1")
    assert e.value.status_code == 404


def test_pull_of_an_unknown_model_fails_clearly(server):
    client = ollama.Client(host=server.url, timeout=30)  # a hang would time out, not pass
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("nonexistent-model")
    assert e.value.status_code >= 400
    msg = e.value.error.lower()
    assert any(w in msg for w in ("offline", "not found", "does not exist", "cannot reach", "cannot resolve")), msg
    with pytest.raises(ollama.ResponseError) as e:
        list(client.pull("nonexistent-model", stream=True))
    assert e.value.error


def test_unload_with_keep_alive_zero(oc, server):
    oc.generate(model=MODEL, prompt="", keep_alive="5m")  # make sure it is loaded
    assert ps_entry(server) is not None
    r = oc.generate(model=MODEL, prompt="", keep_alive=0)
    assert r.done is True and r.done_reason == "unload"
    assert ps_entry(server) is None
    assert MODEL not in [p.model for p in oc.ps().models]
    # and it loads again on the next request
    r = oc.generate(model=MODEL, prompt="hi", options={**GREEDY, "num_predict": 2})
    assert r.done and r.eval_count <= 2
