"""Hostile inputs against a real server, with raw HTTP: path-traversal model names
and digests, a 10 MB body, invalid UTF-8, 100,000-deep JSON, NaN, infinities and
huge integers in options. Each gets a 4xx in its dialect's shape (never a 500, never
a hang), nothing is written outside the model store, and after each the server
still answers a normal chat.

The server runs with ``KILN_MAX_BODY_BYTES`` at 8 MiB, so the 10 MB body is over the
limit (the default limit is 32 MiB). What the real model adds nothing to (a 10 MB
body under the default limit) runs on the fake engine in-process.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from reliability_support import MODEL, greedy_chat, start_server, stop_server

BODY_LIMIT = 8 << 20
TEN_MB = 10 * 1000 * 1000
CHAT = [{"role": "user", "content": "hello"}]
JSON_CT = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("hostile")
    s = start_server(root, env={"KILN_NUM_PARALLEL": "2", "KILN_MAX_BODY_BYTES": str(BODY_LIMIT)})
    s.root = root  # type: ignore[attr-defined]
    yield s
    stop_server(s)


def still_serves(url: str) -> None:
    r = greedy_chat(url, num_predict=1)
    assert r.status_code == 200 and r.json()["done"] is True, r.text[:300]


def is_dialect_error(path: str, r: Any) -> bool:
    """``r``: a response (httpx's or the TestClient's) or (status, body)."""
    body = r[1] if isinstance(r, tuple) else r.content
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if path.startswith("/v1"):
        return isinstance(err, dict) and {"message", "type", "param", "code"} <= err.keys()
    return isinstance(err, str) and bool(err)


def raw_request(url: str, method: str, target: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A request whose target goes out byte for byte (httpx would normalise ``..``)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in {**JSON_CT, **(headers or {}), "Content-Length": str(len(body))}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def tree(root: Path, skip: set[str]) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.name not in skip}


# -- path traversal ---------------------------------------------------------------------------

@pytest.mark.real_model
def test_path_traversal_names(hostile_server, report):
    s = hostile_server
    root: Path = s.root
    outside = root / "outside"  # an absolute path a broken store would write to
    names = ["../../etc/passwd", "..%2F..%2Fx", "..\\..\\x", "/abs/path", str(outside / "abs" / "path"),
             "a\x00b", "smollm2\x00/../../x", "x/../../y", "./x", "~/x", "registry.ollama.ai/../../../x:1",
             "x:../../y", "smollm2:135m/../../../../x"]
    digests = ["sha256:../../etc/passwd", "sha256-" + "../" * 20 + "x", "../../etc/passwd", "/abs/path",
               "sha256:" + "0" * 63 + "/", "sha256:" + "0" * 64 + "\x00"]
    before = tree(root, {"server.log"})
    answers: list[tuple[str, str, int]] = []

    def expect_4xx(what: str, name: str, r: httpx.Response) -> None:
        status = r.status_code
        answers.append((what, name, status))
        assert 400 <= status < 500, (what, name, status, r.text[:200])
        assert is_dialect_error(what.split()[1], r), (what, name, r)

    with httpx.Client(base_url=s.url, timeout=60) as c:
        for name in names:
            expect_4xx("POST /api/show", name, c.post("/api/show", json={"model": name}))
            expect_4xx("DELETE /api/delete", name, c.request("DELETE", "/api/delete", json={"model": name}))
            expect_4xx("POST /api/copy src", name, c.post("/api/copy", json={"source": name, "destination": "ok"}))
            expect_4xx("POST /api/copy dst", name, c.post("/api/copy", json={"source": MODEL, "destination": name}))
            expect_4xx("POST /api/create name", name, c.post("/api/create", json={"model": name, "from": MODEL}))
            expect_4xx("POST /api/create from", name, c.post("/api/create", json={"model": "ok2", "from": name}))
            expect_4xx("POST /api/create files", name, c.post("/api/create", json={
                "model": "ok3", "files": {"model.gguf": name}}))
            expect_4xx("POST /api/pull", name, c.post("/api/pull", json={"model": name, "stream": False}))
            expect_4xx("POST /api/generate", name, c.post("/api/generate", json={"model": name, "prompt": "hi"}))
            expect_4xx("POST /api/chat", name, c.post("/api/chat", json={"model": name, "messages": CHAT}))
            r = c.post("/v1/chat/completions", json={"model": name, "messages": CHAT})
            expect_4xx("POST /v1/chat/completions", name, r)
            assert is_dialect_error("/v1", r)
        for d in digests:
            r = c.post("/api/create", json={"model": "ok4", "files": {"m.gguf": d}})
            expect_4xx("POST /api/create files", d, r)
    # in the URL path itself, byte for byte
    for target in ["/api/blobs/../../etc/passwd", "/api/blobs/..%2F..%2Fetc%2Fpasswd",
                   "/api/blobs/sha256:..%2F..%2Fx", "/api/blobs/sha256-" + "0" * 63 + "%00",
                   "/api/blobs/%2Fabs%2Fpath", "/v1/models/../../etc/passwd", "/v1/models/..%2F..%2Fetc%2Fpasswd",
                   "/v1/models/%2Fabs%2Fpath"]:
        for method in ("HEAD", "POST", "GET"):
            if target.startswith("/v1") and method != "GET":
                continue
            status, body = raw_request(s.url, method, target, b"GGUF" + b"\0" * 60 if method == "POST" else b"")
            answers.append((f"{method} raw", target, status))
            assert 400 <= status < 500, (method, target, status, body[:200])

    after = tree(root, {"server.log"})
    report(requests=len(answers), statuses=sorted({a[2] for a in answers}),
           new_paths=sorted(after - before), abs_created=os.path.exists("/abs"))
    assert after == before, f"files appeared: {sorted(after - before)[:20]}"
    assert not outside.exists()
    assert not os.path.exists("/abs/path")
    still_serves(s.url)


# -- bodies ----------------------------------------------------------------------------------------

def _big_chat() -> bytes:
    """A well-formed 10 MB chat request (2 million words)."""
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * (TEN_MB // 5)}]}).encode()


@pytest.mark.real_model
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions", "/api/create"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_ten_megabyte_body(hostile_server, path, framing, report):
    s = hostile_server
    body = _big_chat()
    assert len(body) >= TEN_MB
    content: Any = body
    if framing == "chunked":  # no Content-Length: the limit must hold while reading
        content = (body[i:i + (1 << 16)] for i in range(0, len(body), 1 << 16))
    try:
        r = httpx.post(s.url + path, content=content, headers=JSON_CT, timeout=120)
        status, shape = r.status_code, is_dialect_error(path, r)
    except httpx.RemoteProtocolError as e:  # the server may close while the client still sends
        status, shape = f"closed ({e})", False
    report(path=path, framing=framing, bytes=len(body), status=status, dialect_shape=shape)
    assert status == 413 and shape, (status, shape)
    still_serves(s.url)


BAD_BODIES = {
    "invalid-utf8": b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "\xff\xfe\xc3\x28 hi"}]}',
    "invalid-utf8-in-key": b'{"model\xff": "smollm2:135m", "messages": []}',
    "lone-surrogate-bytes": b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    "nested-arrays-100k": b'{"model": "smollm2:135m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested-objects-100k": b'{"model": "smollm2:135m", "options": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001,
    "nested-unclosed-100k": b"[" * 100_000,
}


@pytest.mark.real_model
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_malformed_bytes(hostile_server, path, case, report):
    s = hostile_server
    r = httpx.post(s.url + path, content=BAD_BODIES[case], headers=JSON_CT, timeout=60)
    report(path=path, case=case, status=r.status_code, message=r.text[:160])
    assert r.status_code == 400 and is_dialect_error(path, r), r.text[:300]
    still_serves(s.url)


# Python's json reads NaN/Infinity literals and turns 1e309 into inf, so all of these
# reach the server's checks as numbers.
HUGE = str(2**70)
NUMBER_CASES = [
    ("/api/chat", "options", "temperature", "NaN"),
    ("/api/chat", "options", "top_p", "Infinity"),
    ("/api/chat", "options", "repeat_penalty", "-Infinity"),
    ("/api/chat", "options", "temperature", "1e309"),
    ("/api/chat", "options", "num_predict", HUGE),
    ("/api/chat", "options", "num_ctx", HUGE),
    ("/api/chat", "options", "seed", HUGE),
    ("/api/chat", "options", "top_k", "-" + HUGE),
    ("/api/generate", "options", "num_predict", "NaN"),
    ("/api/generate", "options", "min_p", "1e309"),
    ("/api/generate", "options", "num_ctx", "1e309"),
    ("/api/generate", "options", "seed", "Infinity"),
    ("/v1/chat/completions", "", "temperature", "NaN"),
    ("/v1/chat/completions", "", "top_p", "Infinity"),
    ("/v1/chat/completions", "", "max_tokens", "1e309"),
    ("/v1/chat/completions", "", "seed", HUGE),
    ("/v1/chat/completions", "", "presence_penalty", "-Infinity"),
    ("/v1/chat/completions", "", "frequency_penalty", "1e309"),
    ("/v1/completions", "", "temperature", "Infinity"),
    ("/v1/completions", "", "max_tokens", "NaN"),
]


@pytest.mark.real_model
@pytest.mark.parametrize("path,where,key,literal", NUMBER_CASES,
                         ids=[f"{p}-{k}-{v[:8]}" for p, _, k, v in NUMBER_CASES])
def test_hostile_numbers(hostile_server, path, where, key, literal, report):
    s = hostile_server
    base = '"prompt": "hi"' if path in ("/api/generate", "/v1/completions") else f'"messages": {json.dumps(CHAT)}'
    field = f'"options": {{"{key}": {literal}}}' if where == "options" else f'"{key}": {literal}'
    body = f'{{"model": "{MODEL}", {base}, "stream": false, {field}}}'.encode()
    r = httpx.post(s.url + path, content=body, headers=JSON_CT, timeout=120)
    report(path=path, field=key, value=literal[:12], status=r.status_code, message=r.text[:160])
    assert r.status_code == 400 and is_dialect_error(path, r), r.text[:300]
    assert key in r.text, f"the message does not name {key}: {r.text[:300]}"
    still_serves(s.url)


# -- on the fake engine ------------------------------------------------------------------------------

def test_ten_megabyte_body_under_default_limit(make_client, report):
    """At the default limit (32 MiB) a 10 MB chat is read and refused for its length
    with a 400 naming num_ctx, not a 413 and not a 500."""
    c = make_client()
    body = _big_chat()
    r = c.post("/api/chat", content=body, headers=JSON_CT)
    r2 = c.post("/v1/chat/completions", content=_big_chat(), headers=JSON_CT)
    report(bytes=len(body), api_status=r.status_code, v1_status=r2.status_code, message=r.text[:160])
    assert r.status_code == 400 and "num_ctx" in r.json()["error"], r.text[:300]
    assert r2.status_code == 400 and is_dialect_error("/v1", r2)


def test_blob_upload_is_exempt_but_checked(make_client, report):
    """/api/blobs takes bodies over the JSON limit (models are large), and refuses
    one whose bytes do not match its digest."""
    c = make_client(max_body_bytes=1 << 20)
    digest = "sha256:" + "0" * 64
    r = c.post(f"/api/blobs/{digest}", content=b"x" * (2 << 20))
    report(status=r.status_code, message=r.text[:160])
    assert r.status_code == 400 and "error" in r.json(), r.text[:300]
    assert c.head(f"/api/blobs/{digest}").status_code == 404
