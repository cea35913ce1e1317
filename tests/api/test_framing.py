"""Exact wire framing of both dialects, on the deterministic fake engine.

What is pinned here is what the unmodified clients parse: ollama-python runs
``json.loads`` on every NDJSON line, the openai SDK reads ``data:`` events up to
``[DONE]``, Go clients decode integer nanoseconds and RFC 3339 times. The fake
engine emits one word per token, so token counts are word counts.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import re
import struct
import threading
from typing import Any

import pytest
from ollama._types import ListResponse, ProcessResponse, ShowResponse

MODEL = "smollm2:135m"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
CONTINUE_PARAM = re.compile(r'^(\S+)\s+((?:".*")|\S+)$')  # continuedev/continue Ollama.ts
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
CHAT = [{"role": "user", "content": "hello"}]


# -- helpers ---------------------------------------------------------------------------

def media(resp) -> str:
    return resp.headers.get("content-type", "").split(";")[0].strip()


def _compact(obj: Any) -> set[bytes]:
    return {json.dumps(obj, separators=(",", ":"), ensure_ascii=a).encode() for a in (False, True)}


def ndjson(resp) -> list[dict[str, Any]]:
    """The objects of an NDJSON body, checking the framing of every line."""
    assert resp.status_code == 200, resp.text
    assert media(resp) == "application/x-ndjson"
    body = resp.content
    assert body.endswith(b"\n"), body[-80:]
    lines = body.split(b"\n")[:-1]
    assert lines, "empty NDJSON body"
    out = []
    for line in lines:
        assert line.strip(), f"blank line in NDJSON body: {body!r}"
        obj = json.loads(line)
        assert isinstance(obj, dict)
        assert line in _compact(obj), f"not compact JSON: {line!r}"
        out.append(obj)
    return out


def sse(resp) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the event framing."""
    assert resp.status_code == 200, resp.text
    assert media(resp) == "text/event-stream"
    body = resp.text
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    payloads = []
    for ev in events:
        assert ev.startswith("data: "), f"not a data event: {ev!r}"
        assert "\n" not in ev, f"multi-line event: {ev!r}"
        payloads.append(ev[len("data: "):])
    return payloads


def sse_json(resp) -> list[dict[str, Any]]:
    payloads = sse(resp)
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def rfc3339(value: str) -> dt.datetime:
    assert isinstance(value, str) and RFC3339.match(value), value
    parsed = dt.datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_final(obj: dict[str, Any], *, done_reason: str = "stop") -> None:
    assert obj["done"] is True
    assert obj["done_reason"] == done_reason
    for key in DURATIONS:
        assert is_int(obj[key]) and obj[key] >= 0, (key, obj[key])
    assert obj["total_duration"] > 0
    for key in ("prompt_eval_count", "eval_count"):
        assert is_int(obj[key]) and obj[key] >= 0, (key, obj[key])
    assert obj["prompt_eval_count"] > 0


def ollama_error(resp, status: int) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert media(resp) == "application/json"
    body = resp.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"].strip()
    return body["error"]


def openai_error(resp, status: int, kind: str) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert media(resp) == "application/json"
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["type"] == kind
    assert isinstance(err["message"], str) and err["message"].strip()
    return err["message"]


def delete(client, name: str):
    return client.request("DELETE", "/api/delete", json={"model": name})


# -- NDJSON: /api/chat and /api/generate ------------------------------------------------

@pytest.mark.parametrize("path,field", [("/api/chat", "message"), ("/api/generate", "response")])
def test_ndjson_streams_by_default(fake_client, fake_engine, path, field):
    fake_engine.enqueue("The quick brown fox jumps.")
    body = {"model": MODEL, "messages": CHAT, "tools": []} if path == "/api/chat" else {"model": MODEL, "prompt": "hi"}
    lines = ndjson(fake_client.post(path, json=body))  # no "stream" key: streams
    assert len(lines) >= 3
    *chunks, final = lines
    for c in chunks:
        assert c["done"] is False
        assert c["model"] == MODEL
        rfc3339(c["created_at"])
        assert "done_reason" not in c and "total_duration" not in c
    check_final(final)
    rfc3339(final["created_at"])
    if field == "message":
        texts = [c["message"]["content"] for c in chunks]
        assert all(c["message"]["role"] == "assistant" for c in lines)
        assert final["message"] == {"role": "assistant", "content": ""}
    else:
        texts = [c["response"] for c in chunks]
        assert final["response"] == ""
    assert "".join(texts) == "The quick brown fox jumps."
    assert final["eval_count"] == 5


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_stream_false_is_the_merged_stream(fake_client, fake_engine, path):
    reply = "one two three four"
    fake_engine.enqueue(reply, reply)
    body = {"model": MODEL, "messages": CHAT} if path == "/api/chat" else {"model": MODEL, "prompt": "hi"}
    lines = ndjson(fake_client.post(path, json={**body, "stream": True}))
    r = fake_client.post(path, json={**body, "stream": False})
    assert r.status_code == 200
    assert media(r) == "application/json"
    assert r.content.count(b"\n") <= 1  # one object, not NDJSON
    whole = r.json()
    final = lines[-1]
    assert set(whole) == set(final)
    check_final(whole)
    for key in ("model", "done", "done_reason", "prompt_eval_count", "eval_count"):
        assert whole[key] == final[key], key
    if path == "/api/chat":
        assert whole["message"] == {"role": "assistant", "content": "".join(c["message"]["content"] for c in lines)}
        assert whole["message"]["content"] == reply
    else:
        assert whole["response"] == "".join(c["response"] for c in lines) == reply
    rfc3339(whole["created_at"])


@pytest.mark.parametrize("stream", [True, False])
def test_num_predict_length(fake_client, fake_engine, stream):
    fake_engine.enqueue("a b c d e f g h")
    r = fake_client.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": stream,
                                                "options": {"num_predict": 3}})
    final = ndjson(r)[-1] if stream else r.json()
    check_final(final, done_reason="length")
    assert final["eval_count"] == 3


def test_model_is_echoed_as_sent_and_matched_case_insensitively(fake_client, fake_engine):
    fake_engine.enqueue("hi", "hi", "hi", "hi")
    spelled = "SmolLM2:135M"
    for line in ndjson(fake_client.post("/api/chat", json={"model": spelled, "messages": CHAT})):
        assert line["model"] == spelled
    r = fake_client.post("/api/generate", json={"model": spelled, "prompt": "x", "stream": False})
    assert r.json()["model"] == spelled
    r = fake_client.post("/v1/chat/completions", json={"model": spelled, "messages": CHAT})
    assert r.status_code == 200 and r.json()["model"] == spelled
    events = sse_json(fake_client.post("/v1/chat/completions",
                                       json={"model": spelled, "messages": CHAT, "stream": True}))
    assert {e["model"] for e in events} == {spelled}


# -- SSE: /v1/chat/completions and /v1/completions ---------------------------------------

def _content(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def test_chat_completions_sse_framing(fake_client, fake_engine):
    fake_engine.enqueue("Red green blue.")
    r = fake_client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "stream": True})
    events = sse_json(r)
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for e in events:
        assert e["object"] == "chat.completion.chunk"
        assert is_int(e["created"])
        assert e["model"] == MODEL
        assert len(e["choices"]) == 1 and e["choices"][0]["index"] == 0
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    *content, finish = events
    assert all(e["choices"][0]["finish_reason"] is None for e in content)
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert _content(events) == "Red green blue."
    assert all(e.get("usage") is None for e in events)  # not asked for


def test_chat_completions_sse_include_usage(fake_client, fake_engine):
    fake_engine.enqueue("alpha beta gamma delta")
    r = fake_client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "stream": True, "max_tokens": 2,
        "stream_options": {"include_usage": True}})
    events = sse_json(r)
    *content, finish, usage_chunk = events
    assert finish["choices"][0] == {**finish["choices"][0], "delta": {}, "finish_reason": "length"}
    assert usage_chunk["choices"] == []
    assert usage_chunk["object"] == "chat.completion.chunk"
    assert usage_chunk["id"] == finish["id"]
    u = usage_chunk["usage"]
    assert u["completion_tokens"] == 2
    assert is_int(u["prompt_tokens"]) and u["prompt_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert all(e.get("usage") is None for e in content + [finish])
    assert _content(events) == "alpha beta"


def test_chat_completion_non_stream_shape(fake_client, fake_engine):
    fake_engine.enqueue("It is blue.")
    r = fake_client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})  # stream absent: off
    assert r.status_code == 200 and media(r) == "application/json"
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert is_int(body["created"])
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "It is blue."
    assert choice["finish_reason"] == "stop"
    u = body["usage"]
    assert u["completion_tokens"] == 3
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_completions_stream_and_non_stream(fake_client, fake_engine):
    fake_engine.enqueue("once upon a time", "once upon a time")
    body = {"model": MODEL, "prompt": "Tell me", "max_tokens": 10}
    r = fake_client.post("/v1/completions", json=body)
    assert r.status_code == 200
    whole = r.json()
    assert whole["id"].startswith("cmpl-") and whole["object"] == "text_completion"
    assert is_int(whole["created"]) and whole["model"] == MODEL
    (choice,) = whole["choices"]
    assert choice["text"] == "once upon a time" and choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == 4

    events = sse_json(fake_client.post("/v1/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}}))
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("cmpl-")
    assert all(e["object"] == "text_completion" for e in events)
    *content, finish, usage_chunk = events
    assert "".join(e["choices"][0]["text"] for e in content + [finish]) == "once upon a time"
    assert all(e["choices"][0]["finish_reason"] is None for e in content)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4


# -- errors in and before streams ---------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_ndjson_mid_stream_error(make_client, fake_engine, path):
    client = make_client(engine={"fail_at": 2})
    fake_engine.enqueue("one two three four five")
    body = {"model": MODEL, "messages": CHAT} if path == "/api/chat" else {"model": MODEL, "prompt": "x"}
    lines = ndjson(client.post(path, json=body))  # status stays 200
    *chunks, last = lines
    assert set(last) == {"error"} and isinstance(last["error"], str) and last["error"].strip()
    assert len(chunks) >= 1 and all(c["done"] is False for c in chunks)
    assert not any(c.get("done") for c in lines)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_ndjson_failure_without_stream_is_a_status(make_client, fake_engine, path):
    client = make_client(engine={"fail_at": 2})
    fake_engine.enqueue("one two three four five")
    body = {"model": MODEL, "messages": CHAT} if path == "/api/chat" else {"model": MODEL, "prompt": "x"}
    ollama_error(client.post(path, json={**body, "stream": False}), 500)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_sse_mid_stream_error(make_client, fake_engine, path):
    client = make_client(engine={"fail_at": 2})
    fake_engine.enqueue("one two three four five")
    body = {"model": MODEL, "stream": True}
    body |= {"messages": CHAT} if path.endswith("chat/completions") else {"prompt": "x"}
    payloads = sse(client.post(path, json=body))
    assert payloads[-1] == "[DONE]"
    err = json.loads(payloads[-2])
    assert set(err) == {"error"}
    assert isinstance(err["error"]["message"], str) and err["error"]["message"].strip()
    assert err["error"]["type"]
    for p in payloads[:-2]:
        assert "error" not in json.loads(p)
        assert all(c["finish_reason"] is None for c in json.loads(p)["choices"])


@pytest.mark.parametrize("path,body", [
    ("/api/chat", {"model": "nope:1b", "messages": CHAT}),
    ("/api/chat", {"model": "nope:1b", "messages": CHAT, "stream": True}),
    ("/api/generate", {"model": "nope:1b", "prompt": "x", "stream": True}),
    ("/api/generate", {"model": "nope:1b", "prompt": "x"}),
])
def test_unknown_model_before_stream_keeps_404(fake_client, path, body):
    msg = ollama_error(fake_client.post(path, json=body), 404)
    assert msg == "model 'nope:1b' not found"


def test_bad_option_before_stream_keeps_400(fake_client):
    ollama_error(fake_client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": True,
                                                     "options": {"temperature": "hot"}}), 400)
    openai_error(fake_client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "stream": True, "temperature": "hot"}), 400, "invalid_request_error")


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "nope:1b", "messages": CHAT, "stream": True}),
    ("/v1/completions", {"model": "nope:1b", "prompt": "x", "stream": True}),
    ("/v1/embeddings", {"model": "nope:1b", "input": "x"}),
])
def test_openai_unknown_model_before_stream_keeps_404(fake_client, path, body):
    msg = openai_error(fake_client.post(path, json=body), 404, "not_found_error")
    assert "not found" in msg


# -- load / unload ------------------------------------------------------------------------

def _one_object(resp) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    lines = [ln for ln in resp.content.split(b"\n") if ln]
    assert len(lines) == 1, resp.content
    return json.loads(lines[0])


def _loaded(client) -> list[str]:
    r = client.get("/api/ps")
    assert r.status_code == 200
    return [m["name"] for m in r.json()["models"]]


@pytest.mark.parametrize("stream", [None, False])
def test_chat_load_and_unload(fake_client, stream):
    extra = {} if stream is None else {"stream": stream}
    body = _one_object(fake_client.post("/api/chat", json={"model": MODEL, "messages": [], **extra}))
    assert body["done"] is True and body["done_reason"] == "load"
    assert body["message"] == {"role": "assistant", "content": ""}
    assert body["model"] == MODEL
    rfc3339(body["created_at"])
    assert MODEL in _loaded(fake_client)
    body = _one_object(fake_client.post("/api/chat", json={"model": MODEL, "messages": [], "keep_alive": 0, **extra}))
    assert body["done"] is True and body["done_reason"] == "unload"
    assert MODEL not in _loaded(fake_client)


@pytest.mark.parametrize("keep_alive", [0, "0", "0s"])
def test_generate_load_and_unload(fake_client, keep_alive):
    body = _one_object(fake_client.post("/api/generate", json={"model": MODEL, "prompt": "", "stream": False}))
    assert body["done_reason"] == "load" and body["response"] == "" and body["done"] is True
    assert MODEL in _loaded(fake_client)
    # what Open WebUI's "unload" button sends
    body = _one_object(fake_client.post("/api/generate", json={"model": MODEL, "keep_alive": keep_alive, "prompt": ""}))
    assert body["done_reason"] == "unload" and body["done"] is True
    assert MODEL not in _loaded(fake_client)


def test_load_of_unknown_model_is_404(fake_client):
    ollama_error(fake_client.post("/api/chat", json={"model": "nope:1b", "messages": []}), 404)
    ollama_error(fake_client.post("/api/generate", json={"model": "nope:1b", "prompt": ""}), 404)


# -- liveness and meta ----------------------------------------------------------------------

def test_root_and_head(fake_client):
    r = fake_client.get("/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert media(r) == "text/plain"
    h = fake_client.head("/")
    assert h.status_code == 200 and h.content == b""


def test_version(fake_client):
    r = fake_client.get("/api/version")
    assert r.status_code == 200 and media(r) == "application/json"
    v = r.json()["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", v), v
    parsed = tuple(map(int, re.sub(r"^v|-.*", "", v).split(".")))  # Open WebUI's parse
    assert parsed >= (0, 6, 4)  # VS Code Copilot's minimum
    assert fake_client.head("/api/version").status_code == 200


def test_tags(fake_client):
    r = fake_client.get("/api/tags")
    assert r.status_code == 200
    models = r.json()["models"]
    (entry,) = [m for m in models if m["model"] == MODEL]
    assert entry["name"] == entry["model"] == MODEL
    assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
    assert is_int(entry["size"]) and entry["size"] > 0
    rfc3339(entry["modified_at"])
    d = entry["details"]
    assert set(d) >= {"parent_model", "format", "family", "families", "parameter_size", "quantization_level"}
    assert d["format"] == "gguf" and d["family"] == "llama"
    assert d["families"] is None or isinstance(d["families"], list)
    assert d["parameter_size"] and d["quantization_level"]
    for m in models:
        assert ":" in m["name"] and m["name"] == m["model"]
    ListResponse(**r.json())  # ollama-python's model parses it
    assert fake_client.head("/api/tags").status_code == 200


@pytest.mark.parametrize("key", ["model", "name"])
def test_show(fake_client, key):
    r = fake_client.post("/api/show", json={key: MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    info = body["model_info"]
    assert isinstance(info, dict)
    arch = info["general.architecture"]
    assert arch == "llama"
    assert is_int(info[f"{arch}.context_length"]) and info[f"{arch}.context_length"] > 0
    assert is_int(info[f"{arch}.embedding_length"])
    assert isinstance(body["capabilities"], list) and "completion" in body["capabilities"]
    assert set(body["capabilities"]) <= {"completion", "tools", "insert", "vision", "embedding", "thinking"}
    assert isinstance(body["template"], str) and body["template"]
    assert isinstance(body["modelfile"], str)
    rfc3339(body["modified_at"])
    assert body["details"]["format"] == "gguf"
    params = body["parameters"]
    assert params.strip()
    for line in params.split("\n"):
        assert CONTINUE_PARAM.match(line), line
    assert any(line.split()[0] == "stop" for line in params.split("\n"))
    ShowResponse(**body)


def test_show_errors(fake_client):
    assert ollama_error(fake_client.post("/api/show", json={}), 400) == "model is required"
    assert ollama_error(fake_client.post("/api/show", json={"model": "nope:1b"}), 404) == "model 'nope:1b' not found"


def test_ps_after_a_request(fake_client, fake_engine):
    fake_engine.enqueue("hi")
    assert fake_client.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False}).status_code == 200
    r = fake_client.get("/api/ps")
    assert r.status_code == 200
    (m,) = r.json()["models"]
    assert m["name"] == m["model"] == MODEL
    expires = rfc3339(m["expires_at"])
    assert expires > dt.datetime.now(dt.timezone.utc)
    assert is_int(m["size_vram"]) and is_int(m["size"]) and m["size"] > 0
    assert is_int(m["context_length"]) and m["context_length"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", m["digest"])
    assert m["details"]["family"] == "llama"
    ProcessResponse(**r.json())


# -- model management --------------------------------------------------------------------

def test_copy_and_delete(fake_client, fake_engine):
    r = fake_client.post("/api/copy", json={"source": MODEL, "destination": "backup:v1"})
    assert r.status_code == 200 and r.content == b""
    assert "backup:v1" in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]
    fake_engine.enqueue("copied")
    r = fake_client.post("/api/generate", json={"model": "backup:v1", "prompt": "x", "stream": False})
    assert r.status_code == 200 and r.json()["response"] == "copied"

    r = delete(fake_client, "backup:v1")
    assert r.status_code == 200 and r.content == b""
    assert "backup:v1" not in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]
    assert ollama_error(delete(fake_client, "backup:v1"), 404) == "model 'backup:v1' not found"
    r = fake_client.request("DELETE", "/api/delete", json={"name": "backup:v1"})  # legacy key
    assert ollama_error(r, 404) == "model 'backup:v1' not found"
    assert "not found" in ollama_error(
        fake_client.post("/api/copy", json={"source": "nope:1b", "destination": "x:1"}), 404)
    # the source is untouched
    assert MODEL in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]


def test_create_from_existing_model(fake_client, fake_engine):
    r = fake_client.post("/api/create", json={
        "model": "pirate", "from": MODEL, "system": "You are a pirate.",
        "parameters": {"temperature": 0.25, "num_ctx": 1024, "stop": ["ARR"]}})
    statuses = ndjson(r)  # streams by default
    assert all(set(s) >= {"status"} and "error" not in s for s in statuses)
    assert statuses[-1] == {"status": "success"}

    assert "pirate:latest" in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]
    show = fake_client.post("/api/show", json={"model": "pirate"}).json()
    assert show["system"] == "You are a pirate."
    lines = show["parameters"].split("\n")
    assert all(CONTINUE_PARAM.match(line) for line in lines), lines
    assert {line.split()[0] for line in lines} >= {"temperature", "num_ctx", "stop"}

    fake_engine.enqueue("Ahoy")
    r = fake_client.post("/api/chat", json={"model": "pirate", "messages": CHAT, "stream": False})
    assert r.status_code == 200 and r.json()["message"]["content"] == "Ahoy"
    assert r.json()["model"] == "pirate"
    req = fake_engine.requests[-1]
    assert "You are a pirate." in req.prompt
    assert req.sampling.temperature == 0.25
    assert req.sampling.stop == ["ARR"]


def test_create_stream_false_returns_last_status(fake_client):
    r = fake_client.post("/api/create", json={"model": "quiet:v2", "from": MODEL, "system": "Be brief.",
                                              "stream": False})
    assert r.status_code == 200 and media(r) == "application/json"
    assert r.json() == {"status": "success"}
    assert "quiet:v2" in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]
    assert ollama_error(fake_client.post("/api/create", json={"model": "x", "from": "nope:1b", "stream": False}),
                        404)


def test_create_translates_ollamas_fields_and_refuses_what_kiln_does_not_do(fake_client):
    """The Ollama body becomes the internal model to create: messages with their roles in
    lower case, a license list joined by lines; quantize, adapters and modelfile are 400s."""
    r = fake_client.post("/api/create", json={
        "model": "tutor:v1", "from": MODEL, "license": ["MIT", "Apache-2.0"], "stream": False,
        "messages": [{"role": "User", "content": "2+2?"}, {"role": "ASSISTANT", "content": "4"}]})
    assert r.json() == {"status": "success"}, r.text
    show = fake_client.post("/api/show", json={"model": "tutor:v1"}).json()
    assert show["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert show["license"] == "MIT\nApache-2.0"
    for field, value, words in (("quantize", "q4_K_M", "quantize is not supported by kiln create"),
                                ("adapters", {"a.gguf": "sha256:" + "0" * 64}, "adapters (LoRA) are not supported"),
                                ("modelfile", "FROM x", "the modelfile field is no longer part of the API")):
        r = fake_client.post("/api/create", json={"model": "x:1", "from": MODEL, field: value, "stream": False})
        assert words in ollama_error(r, 400), (field, r.text)
    assert "x:1" not in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]


def _in_thread(fn, timeout: float = 30.0):
    """Runs ``fn`` with a hang guard: a pull must fail, not wait forever."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the request hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


CLEAR_PULL_ERROR = ("offline", "not found", "does not exist", "cannot reach", "cannot resolve", "unreachable")


def test_pull_unknown_model_fails_clearly(fake_client):
    r = _in_thread(lambda: fake_client.post("/api/pull", json={"model": "nonexistent-model", "stream": False}))
    assert 400 <= r.status_code < 600
    msg = r.json()["error"]
    assert any(w in msg.lower() for w in CLEAR_PULL_ERROR), msg

    r = _in_thread(lambda: fake_client.post("/api/pull", json={"model": "nonexistent-model"}))
    if r.status_code == 200:  # failed after the first status line: an error line ends the stream
        lines = ndjson(r)
        assert "error" in lines[-1], lines
        msg = lines[-1]["error"]
        assert all("error" not in s for s in lines[:-1])
    else:
        msg = r.json()["error"]
    assert any(w in msg.lower() for w in CLEAR_PULL_ERROR), msg
    assert "nonexistent-model:latest" not in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]


def test_pull_restores_the_bundled_model(fake_client, fake_engine):
    assert delete(fake_client, MODEL).status_code == 200
    assert MODEL not in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]
    ollama_error(fake_client.post("/api/generate", json={"model": MODEL, "prompt": "x"}), 404)

    statuses = ndjson(fake_client.post("/api/pull", json={"model": MODEL}))
    assert statuses[0]["status"] and statuses[-1] == {"status": "success"}
    assert MODEL in [m["name"] for m in fake_client.get("/api/tags").json()["models"]]
    fake_engine.enqueue("back")
    r = fake_client.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
    assert r.status_code == 200 and r.json()["response"] == "back"
    # and with stream false, and the legacy "name" key
    r = fake_client.post("/api/pull", json={"name": MODEL, "stream": False})
    assert r.status_code == 200 and r.json() == {"status": "success"}


def test_blobs(fake_client):
    data = b"not a model, just bytes\n" * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert fake_client.head(f"/api/blobs/{digest}").status_code == 404
    r = fake_client.post(f"/api/blobs/{digest}", content=data)
    assert r.status_code == 201, r.text
    assert fake_client.head(f"/api/blobs/{digest}").status_code == 200

    other = b"something else"
    wrong = "sha256:" + hashlib.sha256(b"what was announced").hexdigest()
    r = fake_client.post(f"/api/blobs/{wrong}", content=other)
    assert "mismatch" in ollama_error(r, 400)
    assert fake_client.head(f"/api/blobs/{wrong}").status_code == 404


# -- /v1 models and embeddings -----------------------------------------------------------

def test_v1_models(fake_client):
    r = fake_client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    (entry,) = [m for m in body["data"] if m["id"] == MODEL]
    assert entry["object"] == "model" and is_int(entry["created"]) and entry["owned_by"] == "library"

    r = fake_client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200
    assert r.json() == entry
    openai_error(fake_client.get("/v1/models/nope:1b"), 404, "not_found_error")


def test_v1_model_id_with_slashes(fake_client):
    name = "hf.co/someone/some-model:latest"
    assert fake_client.post("/api/copy", json={"source": MODEL, "destination": name}).status_code == 200
    assert name in [m["id"] for m in fake_client.get("/v1/models").json()["data"]]
    r = fake_client.get("/v1/models/hf.co%2Fsomeone%2Fsome-model:latest")  # as the openai SDK sends it
    assert r.status_code == 200, r.text
    assert r.json()["id"] == name and r.json()["object"] == "model"
    openai_error(fake_client.get("/v1/models/hf.co%2Fsomeone%2Fother:latest"), 404, "not_found_error")


def _decode_b64(s: str) -> list[float]:
    raw = base64.b64decode(s)
    assert len(raw) % 4 == 0
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_v1_embeddings_float_and_base64(fake_client):
    texts = ["the sky is blue", "grass is green"]
    f = fake_client.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "float"})
    assert f.status_code == 200
    body = f.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert is_int(body["usage"]["prompt_tokens"]) and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    floats = [d["embedding"] for d in body["data"]]
    assert all(isinstance(x, float) for v in floats for x in v)

    b = fake_client.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64"})
    assert b.status_code == 200
    decoded = [_decode_b64(d["embedding"]) for d in b.json()["data"]]
    assert [len(v) for v in decoded] == [len(v) for v in floats]
    for dv, fv in zip(decoded, floats):
        assert dv == pytest.approx(fv, rel=1e-6, abs=1e-7)
    # a single string gives one vector
    one = fake_client.post("/v1/embeddings", json={"model": MODEL, "input": texts[0]}).json()
    assert len(one["data"]) == 1 and one["data"][0]["embedding"] == pytest.approx(floats[0])


def test_api_embed(fake_client):
    r = fake_client.post("/api/embed", json={"model": MODEL, "input": ["one", "two", "three"]})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == MODEL
    vecs = body["embeddings"]
    assert len(vecs) == 3 and len({len(v) for v in vecs}) == 1
    for v in vecs:
        assert math.sqrt(sum(x * x for x in v)) == pytest.approx(1.0, abs=1e-6)
    assert vecs[0] != vecs[1]
    for key in ("total_duration", "load_duration", "prompt_eval_count"):
        assert is_int(body[key])
    single = fake_client.post("/api/embed", json={"model": MODEL, "input": "one"}).json()["embeddings"]
    assert len(single) == 1 and single[0] == pytest.approx(vecs[0])


@pytest.mark.parametrize("empty", [[], ""])
def test_api_embed_empty_input(fake_client, empty):
    # routes.go EmbedHandler: an empty string or list is no input at all
    r = fake_client.post("/api/embed", json={"model": MODEL, "input": empty})
    assert r.status_code == 200, r.text
    assert r.json()["embeddings"] == []


def test_api_embeddings_legacy(fake_client):
    r = fake_client.post("/api/embeddings", json={"model": MODEL, "prompt": "Here is an article about llamas"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"embedding"}
    v = body["embedding"]
    assert len(v) > 0 and all(isinstance(x, float) for x in v)
    ollama_error(fake_client.post("/api/embeddings", json={"model": "nope:1b", "prompt": "x"}), 404)


# -- options reaching the engine ---------------------------------------------------------

OPTIONS = {"temperature": 0.3, "top_k": 7, "top_p": 0.55, "min_p": 0.05, "repeat_penalty": 1.3,
           "repeat_last_n": 17, "presence_penalty": 0.4, "frequency_penalty": 0.6, "seed": 1234,
           "stop": ["END", "\n\n"], "num_predict": 9}


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_options_reach_the_engine(fake_client, fake_engine, path):
    body = {"model": MODEL, "messages": CHAT} if path == "/api/chat" else {"model": MODEL, "prompt": "x"}
    fake_engine.enqueue("ok")
    r = fake_client.post(path, json={**body, "stream": False, "options": {**OPTIONS, "tfs_z": 1.0, "mirostat": 0}})
    assert r.status_code == 200, r.text
    s = fake_engine.requests[-1].sampling
    assert s.temperature == 0.3
    assert s.top_k == 7
    assert s.top_p == 0.55
    assert s.min_p == 0.05
    assert s.repeat_penalty == 1.3
    assert s.repeat_last_n == 17
    assert s.presence_penalty == 0.4
    assert s.frequency_penalty == 0.6
    assert s.seed == 1234
    assert s.stop == ["END", "\n\n"]
    assert s.max_tokens == 9


def test_stop_cuts_before_the_stop_string(fake_client, fake_engine):
    fake_engine.enqueue("alpha beta STOP gamma delta")
    r = fake_client.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False,
                                                "options": {"stop": ["STOP"]}})
    body = r.json()
    assert body["response"].rstrip() == "alpha beta"
    assert "STOP" not in body["response"]
    assert body["done_reason"] == "stop"


def test_openai_defaults_reach_the_engine(fake_client, fake_engine):
    def sampling(body: dict[str, Any]):
        fake_engine.enqueue("ok")
        r = fake_client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **body})
        assert r.status_code == 200, r.text
        return fake_engine.requests[-1].sampling

    s = sampling({})
    assert s.temperature == 1.0 and s.top_p == 1.0
    assert s.max_tokens is None
    assert sampling({"max_tokens": 5}).max_tokens == 5
    assert sampling({"max_completion_tokens": 6}).max_tokens == 6
    s = sampling({"temperature": 0.2, "top_p": 0.7, "seed": 99, "stop": "STOP", "frequency_penalty": 0.5,
                  "presence_penalty": -0.5})
    assert (s.temperature, s.top_p, s.seed, s.stop) == (0.2, 0.7, 99, ["STOP"])
    assert (s.frequency_penalty, s.presence_penalty) == (0.5, -0.5)
    assert sampling({"stop": ["A", "B"]}).stop == ["A", "B"]

    fake_engine.enqueue("ok")
    assert fake_client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}).status_code == 200
    s = fake_engine.requests[-1].sampling
    assert s.temperature == 1.0 and s.top_p == 1.0 and s.max_tokens == 4


def test_max_completion_tokens_limits_the_output(fake_client, fake_engine):
    fake_engine.enqueue("a b c d e f g h i j")
    r = fake_client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT,
                                                       "max_completion_tokens": 3})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


# -- CORS ----------------------------------------------------------------------------------

@pytest.mark.parametrize("origin,allowed", [
    ("http://localhost:3000", True),
    ("http://127.0.0.1:8080", True),
    ("app://obsidian.md", True),
    ("https://evil.example", False),
    ("http://localhost.evil.example", False),
])
def test_cors_preflight(fake_client, origin, allowed):
    r = fake_client.options("/api/chat", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization, x-stainless-os"})
    got = r.headers.get("access-control-allow-origin")
    if allowed:
        assert r.status_code in (200, 204)
        assert got in (origin, "*")
        allowed_headers = r.headers.get("access-control-allow-headers", "").lower()
        for h in ("authorization", "content-type", "x-stainless-os"):
            assert h in allowed_headers
    else:
        assert got is None
