"""What real clients send, on the fake engine (wire shapes and translation; the context
sizes on the real model are in tests/real/test_context.py). Each test here failed on
kiln before issue 12: bodies without a Content-Type (litellm), the default context and
its one allocation, overflow wording (OpenClaw, OpenAI clients), truncate/shift,
num_ctx on /v1, done_reason values, generate's context and suffix, policy defaults on
/v1, pull's insecure flag, token counts of a cancelled request."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import pytest

MODEL = "smollm2:135m"
TRAINED = 8192  # the bundled GGUF's llama.context_length
CHAT = [{"role": "user", "content": "hello there"}]


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))  # the fake engine's tokens are words


# -- bodies without a Content-Type ----------------------------------------------------

# Every route that takes a JSON body, with a body it accepts (litellm's ollama/ and
# ollama_chat/ providers POST with no Content-Type; so do aider and smolagents).
BODY_ROUTES = [
    ("POST", "/api/chat", {"model": MODEL, "messages": CHAT, "stream": False}),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
    ("POST", "/api/embed", {"model": MODEL, "input": "hi"}),
    ("POST", "/api/embeddings", {"model": MODEL, "prompt": "hi"}),
    ("POST", "/api/show", {"model": MODEL}),
    ("POST", "/api/copy", {"source": MODEL, "destination": "copy-nohdr:1"}),
    ("DELETE", "/api/delete", {"model": "copy-nohdr:1"}),
    ("POST", "/api/create", {"model": "made-nohdr:1", "from": MODEL, "stream": False}),
    ("POST", "/api/pull", {"model": MODEL, "stream": False}),
    ("POST", "/api/push", {"model": MODEL}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}),
    ("POST", "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": CHAT}),
    ("POST", "/v1/messages/count_tokens", {"model": MODEL, "messages": CHAT}),
    ("POST", "/v1/responses", {"model": MODEL, "input": "hi"}),
]


def test_every_body_route_is_listed(fake_client):
    """A route added later must be added to BODY_ROUTES too."""
    from fastapi.routing import APIRoute

    def routes(rs):  # FastAPI 0.165 keeps included routers as such
        for r in rs:
            inner = getattr(r, "original_router", None)
            yield from routes(inner.routes) if inner is not None else [r]

    with_body = {(m, r.path) for r in routes(fake_client.app.routes) if isinstance(r, APIRoute) and r.body_field
                 for m in r.methods}
    assert with_body == {(m, p) for m, p, _ in BODY_ROUTES}


@pytest.mark.parametrize("method, path, body", BODY_ROUTES, ids=[p for _, p, _ in BODY_ROUTES])
def test_body_without_content_type_is_json(fake_client, method, path, body):
    if path == "/api/delete":
        assert fake_client.post("/api/copy", json={"source": MODEL, "destination": "copy-nohdr:1"}).status_code == 200
    r = fake_client.request(method, path, content=json.dumps(body).encode())
    assert "content-type" not in r.request.headers  # sent as litellm sends it
    with_header = fake_client.request(method, path, json=body) if path not in ("/api/copy", "/api/delete") else r
    assert r.status_code == with_header.status_code, r.text
    if path == "/api/push":  # refused by kiln, for its own reason, not the body's
        assert "push is not supported" in r.json()["error"]
    else:
        assert r.status_code == 200, r.text


# -- the default context, shown, and one allocation for every smaller request ------------

def test_default_context_is_the_trained_context(fake_client, fake_engine):
    show = fake_client.post("/api/show", json={"model": MODEL}).json()
    assert show["model_info"]["llama.context_length"] == TRAINED
    assert show["kiln"]["context_length"] == TRAINED  # what a request gets, before any load
    assert fake_client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": False}).status_code == 200
    ps = fake_client.get("/api/ps").json()["models"][0]
    assert ps["context_length"] == TRAINED
    assert fake_engine.requests and fake_client.app.state.scheduler.runners[MODEL].spec.num_ctx == TRAINED
    assert fake_client.post("/api/show", json={"model": MODEL}).json()["kiln"]["context_length"] == TRAINED


def test_one_allocation_serves_every_smaller_request(fake_client):
    runners = fake_client.app.state.scheduler.runners
    for num_ctx in (2048, None, 8192, 4096, 512):  # the first, asking for less, loads the default
        body: dict[str, Any] = {"model": MODEL, "messages": CHAT, "stream": False}
        if num_ctx:
            body["options"] = {"num_ctx": num_ctx}
        assert fake_client.post("/api/chat", json=body).status_code == 200
        if num_ctx == 2048:
            first = runners[MODEL]
        assert runners[MODEL] is first, f"reloaded for num_ctx={num_ctx}"
    assert first.spec.num_ctx == TRAINED


def test_a_smaller_num_ctx_is_still_enforced(fake_client):
    r = fake_client.post("/api/generate", json={"model": MODEL, "prompt": words(600), "stream": False,
                                                "options": {"num_ctx": 512}})
    assert r.status_code == 400 and "the context window 512 tokens" in r.json()["error"]


def test_setting_and_memory_budget_cap_the_default(make_client):
    c = make_client(context_length=1024)
    assert c.post("/api/show", json={"model": MODEL}).json()["kiln"]["context_length"] == 1024
    # SmolLM2's KV cache: 30 layers x 3 KV heads x 64 dims x K and V x f16 = 23,040 bytes
    # per token and sequence; 4 sequences of 8,192 would need 755 MB.
    c = make_client(memory_budget=400 << 20)
    show = c.post("/api/show", json={"model": MODEL}).json()["kiln"]
    assert show["context_length"] < TRAINED and show["context_length"] % 256 == 0
    assert "memory budget" in show["context_limited_by"]


# -- overflow in the words clients recognise ---------------------------------------------

def test_overflow_in_ollamas_words_with_kilns_numbers(make_client):
    c = make_client(context_length=64)
    r = c.post("/api/chat", json={"model": MODEL, "stream": False,
                                  "messages": [{"role": "user", "content": words(100)}]})
    assert r.status_code == 400
    msg = r.json()["error"]
    assert msg.startswith("the input length exceeds the context length")  # Ollama's, which OpenClaw keys on
    assert "the context window 64 tokens" in msg and f"trained maximum {TRAINED} tokens" in msg
    assert "raise num_ctx" in msg and "KILN_CONTEXT_LENGTH" in msg and "truncate: true" in msg


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": words(100)}]}, "messages"),
    ("/v1/completions", {"prompt": words(100)}, "prompt"),
])
def test_overflow_in_openais_words(make_client, path, body, param):
    c = make_client(context_length=64)
    for stream in (False, True):
        r = c.post(path, json={"model": MODEL, "stream": stream, **body})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == param
        assert err["type"] == "invalid_request_error"
        assert err["message"].startswith("This model's maximum context length is 64 tokens. However, your "
                                         f"{param} resulted in ")
        assert f"trained maximum {TRAINED} tokens" in err["message"] and "X-Kiln-Num-Ctx" in err["message"]


def test_num_ctx_above_the_trained_context_is_said(fake_client, fake_engine, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln.inference"):
        r = fake_client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": False,
                                                "options": {"num_ctx": 16384}})
    assert r.status_code == 200
    assert f"num_ctx 16384 -> {TRAINED} (the model was trained for {TRAINED} tokens)" in r.headers["x-kiln-adjusted"]
    assert any("num_ctx 16384 asked; using 8192" in rec.getMessage() for rec in caplog.records)
    # the next such request says it again (the log line is per request, not per load)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kiln.inference"):
        r = fake_client.post("/api/generate", json={"model": MODEL, "prompt": words(9000), "stream": False,
                                                    "options": {"num_ctx": 16384}})
    assert r.status_code == 400
    msg = r.json()["error"]
    assert msg.startswith("the input length exceeds the context length")
    assert "asked for num_ctx 16384, more than the model was trained for" in msg and "raise num_ctx" not in msg
    assert any("num_ctx 16384 asked" in rec.getMessage() for rec in caplog.records)


def test_truncate_true_drops_the_oldest_turns_false_refuses(make_client, fake_engine):
    c = make_client(context_length=60, policy={"context_overflow": "truncate"})
    long_chat = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        long_chat += [{"role": "user", "content": f"question {i} " + words(12)},
                      {"role": "assistant", "content": f"answer {i}"}]
    long_chat.append({"role": "user", "content": "last question"})
    r = c.post("/api/chat", json={"model": MODEL, "messages": long_chat, "stream": False, "truncate": False})
    assert r.status_code == 400 and r.json()["error"].startswith("the input length exceeds the context length")

    c = make_client(context_length=60)  # the default policy refuses...
    assert c.post("/api/chat", json={"model": MODEL, "messages": long_chat, "stream": False}).status_code == 400
    r = c.post("/api/chat", json={"model": MODEL, "messages": long_chat, "stream": False, "truncate": True})
    assert r.status_code == 200, r.text  # ...and truncate: true drops turns instead
    assert "oldest message(s) to fit num_ctx=60" in r.headers["x-kiln-adjusted"]
    prompt = fake_engine.requests[-1].prompt
    assert "be brief" in prompt and "last question" in prompt and "question 0" not in prompt


@pytest.mark.parametrize("shift, note", [(False, False), (True, True), (None, False)])
def test_shift_is_accepted_and_documented(fake_client, fake_engine, shift, note):
    body: dict[str, Any] = {"model": MODEL, "messages": CHAT, "stream": False}
    if shift is not None:
        body["shift"] = shift
    fake_engine.enqueue("a b c d e")
    r = fake_client.post("/api/chat", json={**body, "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.json()["done_reason"] == "length"
    assert ("kiln does not shift the context" in r.headers.get("x-kiln-adjusted", "")) == note


def test_shift_must_be_a_boolean(fake_client):
    r = fake_client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "shift": "no"})
    assert r.status_code == 400


# -- num_ctx on /v1 ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, headers", [
    ({"num_ctx": 2048}, {}),  # the OpenAI SDK's extra_body={"num_ctx": ...}
    ({"options": {"num_ctx": 2048}}, {}),
    ({}, {"X-Kiln-Num-Ctx": "2048"}),
])
def test_num_ctx_reaches_the_window_from_v1(fake_client, extra, headers):
    body = {"model": MODEL, "messages": [{"role": "user", "content": words(3000)}], **extra}
    r = fake_client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 400, r.text  # 3,000 tokens fit 8,192 but not the 2,048 asked for
    assert r.json()["error"]["message"].startswith("This model's maximum context length is 2048 tokens")


def test_v1_without_num_ctx_gets_the_trained_context(fake_client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": words(7000)}], "max_tokens": 3}
    r = fake_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 7000


# -- done_reason / finish_reason values -------------------------------------------------

LOOPING = "go go go go go go go go go go go go go go go go go go go go go go go go"


@pytest.mark.parametrize("stream", [False, True])
def test_loop_guard_finish_reason_is_length_on_v1(fake_client, fake_engine, stream):
    fake_engine.enqueue(LOOPING)
    r = fake_client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "stream": stream})
    if stream:
        events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        reasons = [c["choices"][0]["finish_reason"] for c in events if c["choices"]]
        assert reasons[-1] == "length" and set(reasons) <= {None, "length"}
    else:
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.headers["x-kiln-finish-reason"] == "loop"
    metrics = fake_client.get("/metrics").text
    assert 'kiln_guardrail_stops_total{model="smollm2:135m",reason="loop"} 1.0' in metrics


# -- generate's context and suffix ----------------------------------------------------------

def test_generate_returns_context_and_takes_it_back(fake_client, fake_engine):
    fake_engine.enqueue("blue because of scattering")
    r = fake_client.post("/api/generate", json={"model": MODEL, "prompt": "why is the sky blue", "stream": False})
    body = r.json()
    first_prompt = fake_engine.requests[-1].prompt
    ctx = body["context"]
    assert isinstance(ctx, list) and all(isinstance(t, int) for t in ctx)
    assert len(ctx) == len((first_prompt + body["response"]).split())  # prompt and answer, as Ollama
    assert list(body)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]

    lines = [json.loads(x) for x in fake_client.post("/api/generate", json={
        "model": MODEL, "prompt": "and at sunset", "context": ctx}).text.splitlines()]
    assert "context" in lines[-1] and all("context" not in x for x in lines[:-1])
    prompt = fake_engine.requests[-1].prompt
    # the earlier exchange comes back as text before the new prompt
    assert prompt.startswith(" ".join(first_prompt.split()) + " blue because of scattering")
    rendered = fake_client.portal.call(fake_client.app.state.service.render,
                                       fake_client.app.state.store.get(MODEL), _gen("and at sunset"))
    assert prompt.rstrip().endswith(rendered.rstrip())


def _gen(prompt: str):
    from server.inference import Inference

    return Inference(model=MODEL, prompt=prompt)


def test_raw_generate_has_no_context(fake_client):
    body = fake_client.post("/api/generate", json={"model": MODEL, "prompt": "x", "raw": True, "stream": False}).json()
    assert "context" not in body


def test_suffix_through_a_template_that_reads_it(fake_client, fake_engine):
    template = ("{% if suffix %}<PRE> {{ prompt }} <SUF>{{ suffix }} <MID>{% else %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}{% endif %}")
    r = fake_client.post("/api/create", json={"model": "coder-fim:1", "from": MODEL, "template": template,
                                              "stream": False})
    assert r.status_code == 200, r.text
    assert "insert" in fake_client.post("/api/show", json={"model": "coder-fim:1"}).json()["capabilities"]
    r = fake_client.post("/api/generate", json={"model": "coder-fim:1", "prompt": "def add(a, b):",
                                                "suffix": "    return c", "stream": False})
    assert r.status_code == 200, r.text
    assert fake_engine.requests[-1].prompt == "<PRE> def add(a, b): <SUF>    return c <MID>"


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"prompt": "def f():", "suffix": "return 1"}),
    ("/v1/completions", {"prompt": "def f():", "suffix": "return 1"}),
])
def test_suffix_without_fim_support_is_refused(fake_client, path, body):
    r = fake_client.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["message"] if isinstance(err, dict) else err) == f'"{MODEL}" does not support insert'


def test_suffix_through_the_gguf_fim_tokens(fake_client, fake_engine, monkeypatch):
    """A model whose GGUF names FIM tokens (as code models' do) but whose template does not
    read suffix: prefix-suffix-middle with those tokens."""
    from server import fim

    store = fake_client.app.state.store
    m = store.get(MODEL)
    m.name = "fim-tokens:1"
    m.model_info = {**m.model_info, "tokenizer.ggml.fim_pre_token_id": 3, "tokenizer.ggml.fim_suf_token_id": 4,
                    "tokenizer.ggml.fim_mid_token_id": 5}
    store.put(m)
    fim._gguf_tokens.cache_clear()
    r = fake_client.post("/api/generate", json={"model": "fim-tokens:1", "prompt": "x = ", "suffix": "\nprint(x)",
                                                "stream": False})
    assert r.status_code == 200, r.text
    # tokens 3, 4, 5 of the bundled GGUF's vocabulary stand in for a code model's FIM tokens
    assert fake_engine.requests[-1].prompt == "<repo_name>x = <reponame>\nprint(x)<file_sep>"


# -- policy defaults on /v1 -----------------------------------------------------------------

def test_policy_defaults_apply_on_v1(make_client, fake_engine):
    c = make_client(policy={"limits": {"temperature": {"default": 0.1}, "repeat_penalty": {"default": 1.15}}})
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "x"})):
        r = c.post(path, json={"model": MODEL, **body})
        assert r.status_code == 200, r.text
        s = fake_engine.requests[-1].sampling
        assert (s.temperature, s.repeat_penalty, s.top_p) == (0.1, 1.15, 1.0)
        adjusted = r.headers["x-kiln-adjusted"]
        assert "temperature=0.1 (model default)" in adjusted and "top_p=1.0 (OpenAI's default)" in adjusted
        assert "temperature=1.0" not in adjusted
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "temperature": 0.9})
    assert fake_engine.requests[-1].sampling.temperature == 0.9 and "temperature" not in r.headers["x-kiln-adjusted"]


# -- pull ---------------------------------------------------------------------------------------

def _in_thread(fn, timeout=60.0):
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the request hung"
    return out["value"]


def test_pull_accepts_insecure_and_says_no_registry_was_reached(fake_client, caplog):
    with caplog.at_level(logging.INFO):
        r = _in_thread(lambda: fake_client.post("/api/pull", json={"model": "nonexistent-model", "insecure": True,
                                                                   "stream": False}))
    msg = r.json()["error"]
    assert "insecure" not in msg
    assert "no model registry could be reached (registry.ollama.ai: " in msg, msg
    assert not any(rec.exc_info for rec in caplog.records), "a traceback was logged"
    # Open WebUI's pull of the bundled model, with insecure: true, works
    r = fake_client.post("/api/pull", json={"model": MODEL, "insecure": True, "stream": False})
    assert r.json() == {"status": "success"}


# -- token counts of a cancelled request ----------------------------------------------------------

def test_cancelled_request_keeps_its_token_counts(make_client, fake_engine):
    from server.inference import Inference

    c = make_client(engine={"delay": 0.01})
    service = c.app.state.service
    trace: dict[str, Any] = {}

    async def cancel_after_three() -> None:
        gen = service.stream(Inference(model=MODEL, prompt="one two three", trace=trace))
        n = 0
        async for item in gen:
            n += getattr(item, "n_tokens", 0)
            if n >= 3:
                break
        await gen.aclose()  # what a client that goes away does to the generation

    fake_engine.enqueue(words(50))
    c.portal.call(lambda: asyncio.wait_for(cancel_after_three(), 30))
    assert trace["error"] == "cancelled" and trace["done_reason"] == "cancelled"
    assert trace["prompt_tokens"] > 0 and trace["completion_tokens"] >= 3
