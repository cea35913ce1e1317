"""Malformed requests get a 4xx in the dialect's own error shape, and the server
keeps serving.

Every case must answer with a 4xx (never a 500, never FastAPI's 422
``{"detail": ...}``), with ``{"error": "msg"}`` on ``/api`` and
``{"error": {"message", "type", "param", "code"}}`` on ``/v1``, and a message a
person can act on. After each case a normal request on the same server succeeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

MODEL = "smollm2:135m"
CHAT = [{"role": "user", "content": "hello"}]
JSON_CT = {"Content-Type": "application/json"}


@dataclass
class Case:
    id: str
    path: str
    status: int
    body: Any = None  # JSON-encoded unless raw is set
    raw: bytes | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    message: str | None = None  # the exact message, where the contract fixes it

    def request(self) -> dict[str, Any]:
        if self.raw is not None:
            return {"content": self.raw, "headers": {**JSON_CT, **self.headers}}
        return {"content": json.dumps(self.body).encode(), "headers": {**JSON_CT, **self.headers}}


def gen(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", **kw}


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": CHAT, **kw}


def opts(**kw: Any) -> dict[str, Any]:
    return gen(options=kw)


CASES = [
    # -- /api: the body itself -----------------------------------------------------------
    Case("bad-json", "/api/chat", 400, raw=b'{"model": "smollm2:135m", "messages": [}'),
    Case("truncated-json", "/api/generate", 400, raw=b'{"model": "smollm2:135m", "prompt": "hi'),
    Case("empty-body", "/api/chat", 400, raw=b"", message="missing request body"),
    Case("empty-body-generate", "/api/generate", 400, raw=b"", message="missing request body"),
    Case("json-array", "/api/generate", 400, body=[{"model": MODEL, "prompt": "hi"}]),
    Case("json-string", "/api/chat", 400, body="hello"),
    Case("invalid-utf8", "/api/generate", 400, raw=b'{"model": "smollm2:135m", "prompt": "\xff\xfe\xfd"}'),
    Case("deep-nesting", "/api/chat", 400, raw=b"[" * 100_000),
    Case("deep-nesting-in-field", "/api/generate", 400,
         raw=b'{"model": "smollm2:135m", "prompt": "hi", "options": ' + b'{"a":' * 100_000),
    Case("content-type-multipart", "/api/chat", 415, body=chat(),
         headers={"Content-Type": "multipart/form-data; boundary=xyz"}),
    Case("content-type-xml", "/api/generate", 415, body=gen(), headers={"Content-Type": "application/xml"}),
    # -- /api: wrong types -----------------------------------------------------------------
    Case("stream-yes", "/api/chat", 400, body=chat(stream="yes")),
    Case("messages-string", "/api/chat", 400, body={"model": MODEL, "messages": "hi"}),
    Case("message-not-object", "/api/chat", 400, body={"model": MODEL, "messages": ["hi"]}),
    Case("options-list", "/api/generate", 400, body=gen(options=[])),
    Case("temperature-string", "/api/generate", 400, body=opts(temperature="hot")),
    Case("stop-number", "/api/generate", 400, body=opts(stop=5)),
    Case("model-number", "/api/chat", 400, body={"model": 42, "messages": CHAT}),
    Case("prompt-object", "/api/generate", 400, body={"model": MODEL, "prompt": {"text": "hi"}}),
    # -- /api: models ----------------------------------------------------------------------
    Case("unknown-model-chat", "/api/chat", 404, body={"model": "nope:1b", "messages": CHAT},
         message="model 'nope:1b' not found"),
    Case("unknown-model-generate", "/api/generate", 404, body={"model": "nope", "prompt": "hi"},
         message="model 'nope' not found"),
    Case("unknown-model-show", "/api/show", 404, body={"model": "nope:1b"}, message="model 'nope:1b' not found"),
    Case("unknown-model-embed", "/api/embed", 404, body={"model": "nope:1b", "input": "x"}),
    Case("missing-model-chat", "/api/chat", 400, body={"messages": CHAT}, message="model is required"),
    Case("missing-model-show", "/api/show", 400, body={}, message="model is required"),
    Case("missing-model-generate", "/api/generate", 404, body={"prompt": "hi"}),  # Ollama: 404 here
    # -- /api: values ----------------------------------------------------------------------
    Case("invalid-role", "/api/chat", 400, body={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
    Case("num-predict-below-minus-2", "/api/generate", 400, body=opts(num_predict=-3)),
    Case("negative-top-k", "/api/generate", 400, body=opts(top_k=-1)),
    Case("negative-temperature", "/api/chat", 400, body=chat(options={"temperature": -1})),
    Case("top-p-above-1", "/api/generate", 400, body=opts(top_p=1.5)),
    Case("huge-num-ctx", "/api/generate", 400, body=opts(num_ctx=10**12)),
    Case("huge-seed", "/api/generate", 400, body=opts(seed=2**64 + 1)),
    Case("nan-option", "/api/generate", 400, raw=b'{"model": "smollm2:135m", "prompt": "hi", "options": {"temperature": NaN}}'),
    Case("infinity-option", "/api/chat", 400,
         raw=b'{"model": "smollm2:135m", "messages": [], "options": {"top_p": Infinity}}'),
    Case("invalid-format", "/api/generate", 400, body=gen(format="yaml")),
    Case("format-number", "/api/chat", 400, body=chat(format=3)),
    Case("invalid-keep-alive", "/api/generate", 400, body=gen(keep_alive="forever")),
    Case("keep-alive-no-unit", "/api/chat", 400, body=chat(keep_alive="5 minutes")),
    Case("invalid-think", "/api/chat", 400, body=chat(think="extreme")),
    Case("think-unsupported", "/api/chat", 400, body=chat(think=True)),
    Case("raw-with-template", "/api/generate", 400, body=gen(raw=True, template="{{ .Prompt }}")),
    Case("top-logprobs-21", "/api/generate", 400, body=gen(logprobs=True, top_logprobs=21)),
    Case("embed-input-number", "/api/embed", 400, body={"model": MODEL, "input": 5}),
    Case("lone-surrogate", "/api/chat", 400, raw=b'{"model": "smollm2:135m", "messages": [{"role": "user", '
                                                 b'"content": "\\ud800"}]}'),
    Case("v1-lone-surrogate", "/v1/chat/completions", 400,
         raw=b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    Case("model-newline", "/api/show", 400, body={"model": "smollm2:135m\n"}),
    Case("model-escape", "/api/chat", 400, body={"model": "smollm2\x1b[2J:135m", "messages": CHAT}),
    # -- /api: names that try to leave the store ------------------------------------------------
    Case("traversal-show", "/api/show", 400, body={"model": "../../etc/passwd"}),
    Case("traversal-chat", "/api/chat", 400, body={"model": "../../etc/passwd", "messages": CHAT}),
    Case("traversal-delete", "/api/delete", 400, method="DELETE", body={"model": "../../etc/passwd"}),
    Case("too-many-parts-delete", "/api/delete", 400, method="DELETE", body={"model": "a/b/c/d/e"}),
    Case("traversal-copy-source", "/api/copy", 400, body={"source": "../../etc/passwd", "destination": "x:1"}),
    Case("traversal-copy-destination", "/api/copy", 400, body={"source": MODEL, "destination": "../../evil"}),
    Case("too-many-parts-copy", "/api/copy", 400, body={"source": MODEL, "destination": "a/b/c/d/e"}),
    Case("traversal-create", "/api/create", 400, body={"model": "../../evil", "from": MODEL}),
    Case("too-many-parts-create", "/api/create", 400, body={"model": "a/b/c/d/e", "from": MODEL}),
    Case("create-from-path", "/api/create", 400, body={"model": "evil", "from": "/etc/passwd"}),
    Case("blob-bad-digest", "/api/blobs/sha256:..", 400, raw=b"x"),
    Case("blob-short-digest", "/api/blobs/sha256:abc123", 400, raw=b"x"),
    # -- /v1 ---------------------------------------------------------------------------------
    Case("v1-bad-json", "/v1/chat/completions", 400, raw=b'{"model": "smollm2:135m", "messages": [{]}'),
    Case("v1-truncated-json", "/v1/completions", 400, raw=b'{"model": "smollm2:135m", "prompt": "a'),
    Case("v1-empty-body", "/v1/chat/completions", 400, raw=b""),
    Case("v1-json-array", "/v1/chat/completions", 400, body=[chat()]),
    Case("v1-empty-messages", "/v1/chat/completions", 400, body={"model": MODEL, "messages": []}),
    Case("v1-messages-string", "/v1/chat/completions", 400, body={"model": MODEL, "messages": "hi"}),
    Case("v1-stream-yes", "/v1/chat/completions", 400, body=chat(stream="yes")),
    Case("v1-temperature-string", "/v1/chat/completions", 400, body=chat(temperature="hot")),
    Case("v1-temperature-negative", "/v1/chat/completions", 400, body=chat(temperature=-1)),
    Case("v1-temperature-nan", "/v1/chat/completions", 400,
         raw=b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    Case("v1-invalid-role", "/v1/chat/completions", 400,
         body={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
    Case("v1-message-without-role", "/v1/chat/completions", 400, body={"model": MODEL, "messages": [{"content": "x"}]}),
    Case("v1-n-0", "/v1/chat/completions", 400, body=chat(n=0)),
    Case("v1-n-129", "/v1/chat/completions", 400, body=chat(n=129)),
    Case("v1-max-tokens-negative", "/v1/chat/completions", 400, body=chat(max_tokens=-5)),
    Case("v1-huge-seed", "/v1/chat/completions", 400, body=chat(seed=2**64 + 1)),
    Case("v1-response-format", "/v1/chat/completions", 400, body=chat(response_format={"type": "yaml"})),
    Case("v1-unknown-model", "/v1/chat/completions", 404, body={"model": "nope:1b", "messages": CHAT}),
    Case("v1-missing-model", "/v1/chat/completions", 400, body={"messages": CHAT}),
    Case("v1-content-type-xml", "/v1/chat/completions", 415, body=chat(), headers={"Content-Type": "application/xml"}),
    Case("v1-invalid-utf8", "/v1/completions", 400, raw=b'{"model": "smollm2:135m", "prompt": "\xc3\x28"}'),
    Case("v1-deep-nesting", "/v1/chat/completions", 400, raw=b"[" * 100_000),
    Case("v1-completions-too-many-prompts", "/v1/completions", 400, body={"model": MODEL, "prompt": ["a"] * 65}),
    Case("v1-encoding-int8", "/v1/embeddings", 400, body={"model": MODEL, "input": "x", "encoding_format": "int8"}),
    Case("v1-embeddings-empty", "/v1/embeddings", 400, body={"model": MODEL, "input": ""}),
    Case("v1-embeddings-object", "/v1/embeddings", 400, body={"model": MODEL, "input": {"text": "x"}}),
    Case("v1-model-traversal", "/v1/models/..%2F..%2Fetc%2Fpasswd", 400, method="GET"),
]

assert len({c.id for c in CASES}) == len(CASES)


def check_error(resp: httpx.Response, case: Case) -> str:
    """The status and the dialect's error shape; returns the message."""
    assert resp.status_code == case.status, (resp.status_code, resp.text[:300])
    assert resp.status_code != 422 and resp.status_code < 500
    assert resp.headers.get("content-type", "").split(";")[0] == "application/json", resp.headers
    body = resp.json()
    assert "detail" not in body, body
    if case.path.startswith("/v1/"):
        assert set(body) == {"error"}, body
        err = body["error"]
        assert isinstance(err, dict) and set(err) >= {"message", "type", "param", "code"}, err
        if case.status in (400, 404):  # the contract fixes these two; others just need a type
            assert err["type"] == {400: "invalid_request_error", 404: "not_found_error"}[case.status], err
        assert isinstance(err["type"], str) and err["type"]
        message = err["message"]
    else:
        assert set(body) == {"error"}, body
        message = body["error"]
    assert isinstance(message, str)
    assert len(message.strip()) >= 8, message
    assert "Traceback" not in message and "<class" not in message
    if case.message is not None:
        assert message == case.message
    return message


def send(client: Any, case: Case) -> httpx.Response:
    return client.request(case.method, case.path, **case.request())


def normal_requests_work(client: Any, enqueue: Any = None) -> None:
    if enqueue:
        enqueue("still fine")
    r = client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": False})
    assert r.status_code == 200, r.text
    if enqueue:
        assert r.json()["message"]["content"] == "still fine"
        enqueue("also fine")
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert r.status_code == 200, r.text
    if enqueue:
        assert r.json()["choices"][0]["message"]["content"] == "also fine"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_request(shared_client, fake_engine, case):
    before = sorted(p.name for p in shared_client.store_root.parent.iterdir())
    check_error(send(shared_client, case), case)
    normal_requests_work(shared_client, fake_engine.enqueue)
    # nothing was written outside the store by a name that tried to leave it
    assert sorted(p.name for p in shared_client.store_root.parent.iterdir()) == before
    tags = [m["name"] for m in shared_client.get("/api/tags").json()["models"]]
    assert not any("evil" in t or "passwd" in t for t in tags), tags


def test_the_table_is_big_and_varied():
    assert len(CASES) >= 20
    assert sum(c.path.startswith("/v1/") for c in CASES) >= 10
    assert {400, 404, 415} <= {c.status for c in CASES}


# -- the same on the real server -------------------------------------------------------------

REAL_CASES = ["bad-json", "empty-body", "json-array", "invalid-utf8", "deep-nesting", "content-type-xml",
              "nan-option", "unknown-model-chat", "missing-model-chat", "negative-top-k", "invalid-keep-alive",
              "traversal-show", "v1-empty-messages", "v1-bad-json", "v1-encoding-int8", "v1-unknown-model"]


@pytest.mark.real_model
def test_malformed_against_the_real_server(server):
    by_id = {c.id: c for c in CASES}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name in REAL_CASES:
            case = by_id[name]
            check_error(send(client, case), case)
        r = client.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                                           "stream": False, "options": {"num_predict": 8, "temperature": 0}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["done"] is True and body["message"]["content"].strip()
        assert 0 < body["eval_count"] <= 8
        r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 8,
                                                      "messages": [{"role": "user", "content": "Say hi."}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip()
