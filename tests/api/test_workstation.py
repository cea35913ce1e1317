"""The HTTP edge of a workstation server (issue 11): what a web page, a hostile name or
a stray key can make kiln do. Each finding of the attack is a class of requests here,
sent to the whole app on the fake engine; nothing may reach a handler that should not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import socket
import string
from pathlib import Path
from typing import Any

import pytest

from server.app import check_exposure
from server.cli import SafeFormatter
from server.middleware import CONTROL_CHARS
from server.settings import Settings

MODEL = "smollm2:135m"
CHAT = [{"role": "user", "content": "hello"}]
INFERENCE_KEY = "inference-key-0123456789"
ADMIN_KEY = "admin-key-abcdefghijklmn"


def ollama_refusal(resp, status: int) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def openai_refusal(resp, status: int) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    return err["message"]


def manifests(root: Path) -> dict[str, str]:
    """Every manifest in the store and the digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "manifests").rglob("*.json"))}


def blobs(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").iterdir()}


# Every simple request a page may send without a preflight, at every route that
# changes something or runs a model (the CSRF finding), plus reads.
BLOB = b"GGUF" + b"\0" * 60
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
CSRF = [
    ("POST", "/api/create", {"model": MODEL, "from": MODEL, "system": "You are evil now.", "stream": False}),
    ("POST", "/api/copy", {"source": MODEL, "destination": "stolen:latest"}),
    ("DELETE", "/api/delete", {"model": MODEL}),
    ("POST", "/api/pull", {"model": "evil/model", "stream": False}),
    ("POST", "/api/push", {"model": MODEL, "stream": False}),
    ("POST", "/api/chat", {"model": MODEL, "messages": CHAT, "stream": False}),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi"}),
    ("POST", f"/api/blobs/{BLOB_DIGEST}", None),
    ("GET", "/api/tags", None),
    ("POST", "/api/show", {"model": MODEL}),
    ("GET", "/metrics", None),
]
SIMPLE_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]


def send(client, method: str, path: str, body: Any, headers: dict[str, str]):
    content = BLOB if path.startswith("/api/blobs/") else (json.dumps(body).encode() if body is not None else None)
    return client.request(method, path, content=content, headers={"Content-Type": "application/json", **headers})


def refusal(resp, path: str, status: int) -> str:
    return openai_refusal(resp, status) if path.startswith("/v1") else ollama_refusal(resp, status)


# -- 1. the Host check (DNS rebinding) -------------------------------------------------------

ALLOWED_HOSTS = ["localhost", "localhost:11434", "LOCALHOST:11434", "localhost.", "127.0.0.1", "127.0.0.1:11434",
                 "127.1.2.3:80", "[::1]:11434", "[::1]", "::1", "0.0.0.0:11434", "app.localhost:11434",
                 "printer.local", "kiln.internal:11434", "10.1.2.3:11434", "192.168.1.20", "172.16.0.9",
                 "[fd00::1]:11434", ""]
REFUSED_HOSTS = ["evil.example", "evil.example:11434", "attacker.com", "localhost.evil.example",
                 "127.0.0.1.nip.io", "evil.localhost.com", "8.8.8.8:11434", "[2001:4860:4860::8888]:11434",
                 "169.254.169.254", "172.32.0.1", "localhostx", "internal"]


def test_host_check_allows_local_names(make_client):
    client = make_client()
    for host in ALLOWED_HOSTS:
        r = client.get("/api/tags", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)


def test_host_check_refuses_other_names_on_every_route(make_client, fake_engine):
    client = make_client()
    root = client.app.state.store.root
    before = manifests(root), blobs(root)
    for host in REFUSED_HOSTS:
        for method, path, body in CSRF:
            r = send(client, method, path, body, {"Host": host, "Content-Type": "application/json"})
            assert "KILN_ALLOWED_HOSTS" in refusal(r, path, 403), (host, path)
    assert (manifests(root), blobs(root)) == before
    assert fake_engine.requests == []


def test_host_check_knows_this_machine(make_client):
    client = make_client()
    assert client.get("/api/tags", headers={"Host": f"{socket.gethostname()}:11434"}).status_code == 200
    assert client.get("/api/tags", headers={"Host": socket.gethostname().upper()}).status_code == 200


def test_open_webui_style_backend_is_unaffected(make_client, fake_engine):
    """Open WebUI calls Ollama from its backend, with no Origin, at the address it is
    configured with: in Docker that is host.docker.internal or the bridge's address."""
    client = make_client()
    for host in ("host.docker.internal:11434", "172.17.0.1:11434", "127.0.0.1:11434", "localhost:11434"):
        headers = {"Host": host, "User-Agent": "Python/3.11 aiohttp/3.9.5"}
        assert client.get("/api/tags", headers=headers).status_code == 200, host
        assert client.get("/api/version", headers=headers).status_code == 200, host
        fake_engine.enqueue("hi there")
        r = client.post("/api/chat", json={"model": MODEL, "messages": CHAT}, headers=headers)
        assert r.status_code == 200 and r.text.strip().endswith("}"), (host, r.text)
        fake_engine.enqueue("hi there")
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "stream": True},
                        headers={**headers, "Authorization": "Bearer unused"})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), (host, r.text)


def test_allowed_hosts_setting(make_client):
    client = make_client(allowed_hosts=["kiln.example.com", "*.corp.example"])
    for host in ("kiln.example.com", "KILN.example.com:8080", "a.corp.example", "b.a.corp.example:1", "corp.example"):
        assert client.get("/api/tags", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example.com", "kiln.example.com.evil", "corp.example.evil"):
        assert client.get("/api/tags", headers={"Host": host}).status_code == 403, host


def test_allowed_hosts_star_turns_the_check_off(make_client):
    client = make_client(allowed_hosts=["*"])
    assert client.get("/api/tags", headers={"Host": "evil.example"}).status_code == 200


def test_host_check_beyond_loopback(make_client):
    """A keyed server beyond loopback is reached by names it cannot know, and a page
    has no key: no Host check unless hosts are listed. Without a key it stays on."""
    keyed = {"Host": "gpu-box.corp.example:11434", "Authorization": f"Bearer {INFERENCE_KEY}"}
    client = make_client(host="0.0.0.0:11434", api_keys=[INFERENCE_KEY])
    assert client.get("/api/tags", headers=keyed).status_code == 200
    client = make_client(host="0.0.0.0:11434", api_keys=[INFERENCE_KEY], allowed_hosts=["kiln.corp.example"])
    assert client.get("/api/tags", headers=keyed).status_code == 403
    client = make_client(host="0.0.0.0:11434", insecure_no_auth=True)
    assert client.get("/api/tags", headers={"Host": "evil.example"}).status_code == 403


# -- 2. Origin enforcement (CSRF) ---------------------------------------------------------------

REFUSED_ORIGINS = ["https://evil.example", "http://evil.example:11434", "null", "http://localhost.evil.example",
                   "http://127.0.0.1.evil.example", "https://localhost:3000.evil.example", "chrome-extension://abc",
                   "http://[::1]:3000", "ws://localhost", "http://10.0.0.5"]
ALLOWED_ORIGINS = ["http://localhost", "https://localhost", "http://localhost:3000", "https://127.0.0.1:8443",
                   "http://127.0.0.1", "http://0.0.0.0:8080", "app://obsidian.md", "file://", "tauri://localhost",
                   "vscode-webview://1234abcd", "vscode-file://vscode-app"]


def test_foreign_origin_is_refused_before_any_handler(make_client, fake_engine):
    client = make_client()
    root = client.app.state.store.root
    before = manifests(root), blobs(root)
    for origin in REFUSED_ORIGINS:
        for ctype in SIMPLE_TYPES:
            for method, path, body in CSRF:
                r = send(client, method, path, body, {"Origin": origin, "Content-Type": ctype})
                assert "KILN_ORIGINS" in refusal(r, path, 403), (origin, ctype, path)
                assert "access-control-allow-origin" not in r.headers
    assert (manifests(root), blobs(root)) == before
    assert fake_engine.requests == []
    assert MODEL in [m["name"] for m in client.get("/api/tags").json()["models"]]


def test_foreign_preflight_is_refused(make_client):
    client = make_client()
    for origin, path in zip(REFUSED_ORIGINS, ["/api/chat", "/v1/chat/completions", "/api/create"] * 4):
        r = client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "content-type"})
        refusal(r, path, 403)
        assert "access-control-allow-origin" not in r.headers


def test_ollama_default_origins_are_allowed(make_client, fake_engine):
    client = make_client()
    for origin in ALLOWED_ORIGINS:
        fake_engine.enqueue("hi")
        r = client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": False},
                        headers={"Origin": origin})
        assert r.status_code == 200, (origin, r.text)
        assert r.headers["access-control-allow-origin"] == origin
        r = client.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, x-api-key"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, origin


def test_configured_origins(make_client):
    client = make_client(origins=["https://my-webui.example", "chrome-extension://*"])
    for origin in ("https://my-webui.example", "chrome-extension://abcdef"):
        assert client.get("/api/tags", headers={"Origin": origin}).status_code == 200, origin
    for origin in ("https://my-webui.example.evil", "http://my-webui.example"):
        assert client.get("/api/tags", headers={"Origin": origin}).status_code == 403, origin
    assert make_client(origins=["*"]).get("/api/tags", headers={"Origin": "https://any.example"}).status_code == 200


def test_same_origin_page_is_not_cross_origin(make_client):
    """A page kiln's own Host served (gin-contrib/cors lets it through the same way);
    the Host check decides whether that Host is ours."""
    client = make_client(allowed_hosts=["kiln.lan"])
    headers = {"Host": "kiln.lan:11434", "Origin": "http://kiln.lan:11434"}
    assert client.get("/api/tags", headers=headers).status_code == 200
    rebound = {"Host": "evil.example:11434", "Origin": "http://evil.example:11434"}
    assert client.get("/api/tags", headers=rebound).status_code == 403


def test_refused_origin_is_logged_and_counted(make_client, caplog):
    client = make_client()
    with caplog.at_level(logging.INFO, logger="kiln.access"):
        client.post("/api/create", content=b"{}", headers={"Origin": "https://evil.example"})
    line = [r.getMessage() for r in caplog.records if r.name == "kiln.access"][-1]
    assert "status=403" in line and "evil.example" in line
    metrics = client.get("/metrics").text
    assert 'kiln_requests_total{endpoint="/api/create",model="",status="403"} 1.0' in metrics


# -- 3. scoped keys --------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/api/create", {"model": "mine:v1", "from": MODEL, "stream": False}),
    ("POST", "/api/copy", {"source": MODEL, "destination": "copy:v1"}),
    ("DELETE", "/api/delete", {"model": "copy:v1"}),
    ("POST", "/api/pull", {"model": MODEL, "stream": False}),
    ("POST", "/api/push", {"model": MODEL, "stream": False}),
    ("HEAD", f"/api/blobs/{BLOB_DIGEST}", None),
    ("POST", f"/api/blobs/{BLOB_DIGEST}", None),
]
INFERENCE_ROUTES = [
    ("POST", "/api/chat", {"model": MODEL, "messages": CHAT, "stream": False}),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
    ("POST", "/api/embed", {"model": MODEL, "input": "hi"}),
    ("GET", "/api/tags", None),
    ("POST", "/api/show", {"model": MODEL}),
    ("GET", "/api/ps", None),
    ("GET", "/api/version", None),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT}),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_inference_key_runs_models_but_cannot_manage_them(make_client, fake_engine):
    client = make_client(api_keys=[INFERENCE_KEY], admin_keys=[ADMIN_KEY])
    root = client.app.state.store.root
    before = manifests(root), blobs(root)
    for method, path, body in ADMIN_ROUTES:
        r = send(client, method, path, body, bearer(INFERENCE_KEY))
        if method == "HEAD":
            assert r.status_code == 403
        else:
            assert "admin key" in refusal(r, path, 403), path
        assert send(client, method, path, body, {}).status_code == 401, path
        assert send(client, method, path, body, bearer("wrong")).status_code == 401, path
    assert (manifests(root), blobs(root)) == before
    for method, path, body in INFERENCE_ROUTES:
        fake_engine.enqueue("ok")
        r = send(client, method, path, body, bearer(INFERENCE_KEY))
        assert r.status_code == 200, (path, r.text)
        assert send(client, method, path, body, {}).status_code == 401, path


def test_admin_key_opens_every_route(make_client, fake_engine):
    client = make_client(api_keys=[INFERENCE_KEY], admin_keys=[ADMIN_KEY])
    for method, path, body in ADMIN_ROUTES + INFERENCE_ROUTES:
        fake_engine.enqueue("ok")
        r = send(client, method, path, body, bearer(ADMIN_KEY))
        assert r.status_code not in (401, 403), (path, r.status_code, r.text)
    assert "mine:v1" in [m["name"] for m in client.get("/api/tags", headers=bearer(ADMIN_KEY)).json()["models"]]


def test_with_only_inference_keys_nobody_manages_models(make_client):
    """Any key configured makes the admin routes need an admin key: an existing
    KILN_API_KEY alone no longer lets a holder replace models."""
    client = make_client(api_keys=[INFERENCE_KEY])
    r = client.post("/api/copy", json={"source": MODEL, "destination": "x:1"}, headers=bearer(INFERENCE_KEY))
    assert "KILN_ADMIN_KEYS" in ollama_refusal(r, 403)


def test_admin_keys_alone_protect_everything(make_client, tmp_path):
    path = tmp_path / "admin.txt"
    path.write_text(f"\n{ADMIN_KEY}\n")
    client = make_client(admin_keys_file=path)
    assert client.get("/api/tags").status_code == 401
    assert client.get("/api/tags", headers=bearer(ADMIN_KEY)).status_code == 200
    assert client.post("/api/copy", json={"source": MODEL, "destination": "x:1"},
                       headers=bearer(ADMIN_KEY)).status_code == 200
    check_exposure(Settings(host="0.0.0.0:11434", admin_keys_file=path))  # an admin key alone may listen beyond loopback
    with pytest.raises(ValueError):
        check_exposure(Settings(host="0.0.0.0:11434"))


def test_x_api_key_is_a_key_too(make_client, fake_engine):
    client = make_client(api_keys=[INFERENCE_KEY], admin_keys=[ADMIN_KEY])
    assert client.get("/api/tags", headers={"x-api-key": INFERENCE_KEY}).status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": "wrong"}).status_code == 401
    r = client.post("/api/copy", json={"source": MODEL, "destination": "x:1"}, headers={"x-api-key": INFERENCE_KEY})
    assert r.status_code == 403
    r = client.post("/api/copy", json={"source": MODEL, "destination": "x:1"}, headers={"x-api-key": ADMIN_KEY})
    assert r.status_code == 200
    # the same key in both headers is one key
    both = {"x-api-key": INFERENCE_KEY, **bearer(INFERENCE_KEY)}
    assert client.get("/api/tags", headers=both).status_code == 200


@pytest.mark.parametrize("headers,what", [
    ([("authorization", f"Bearer {ADMIN_KEY}"), ("authorization", "Bearer wrong")], "Authorization"),
    ([("authorization", "Bearer wrong"), ("authorization", f"Bearer {ADMIN_KEY}")], "Authorization"),
    ([("authorization", f"Bearer {ADMIN_KEY}"), ("authorization", f"Bearer {ADMIN_KEY}")], "Authorization"),
    ([("x-api-key", INFERENCE_KEY), ("x-api-key", ADMIN_KEY)], "X-Api-Key"),
    ([("authorization", f"Bearer {INFERENCE_KEY}"), ("x-api-key", ADMIN_KEY)], "different keys"),
])
def test_two_credentials_are_refused(make_client, headers, what):
    """400, not 401: the request is malformed (Authorization is not a list field), and
    which of two a proxy or server honours differs — the way a key check is bypassed."""
    client = make_client(api_keys=[INFERENCE_KEY], admin_keys=[ADMIN_KEY])
    for path in ("/api/copy", "/v1/models"):
        method = "POST" if path == "/api/copy" else "GET"
        r = client.request(method, path, headers=headers, json={"source": MODEL, "destination": "x:1"})
        assert what in refusal(r, path, 400), path
    assert "x:latest" not in str(client.get("/api/tags", headers=bearer(ADMIN_KEY)).json())


def test_refusals_on_anthropic_paths_are_in_anthropic_shape(make_client):
    client = make_client(api_keys=[INFERENCE_KEY])
    for headers, status, kind in (({}, 401, "authentication_error"),
                                  ({"Origin": "https://evil.example"}, 403, "permission_error"),
                                  ({"Host": "evil.example"}, 403, "permission_error")):
        r = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": CHAT}, headers=headers)
        assert r.status_code == status
        body = r.json()
        assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"], body


def test_allowed_page_can_read_why_it_was_refused(make_client):
    client = make_client(api_keys=[INFERENCE_KEY])
    r = client.get("/api/tags", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


# -- 4. metric labels are bounded ------------------------------------------------------------

def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def _junk(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def test_metric_series_do_not_grow_with_random_models_and_paths(make_client, fake_engine):
    client = make_client()
    rng = random.Random(11)

    def hostile_round() -> None:
        name = f"{_junk(rng, 12)}:{_junk(rng, 6)}"
        for r in (client.post("/api/chat", json={"model": name, "messages": CHAT}),
                  client.post("/v1/chat/completions", json={"model": name, "messages": CHAT}),
                  client.post("/api/show", json={"model": name}),
                  client.post("/api/embed", json={"model": "bad\nname" + _junk(rng, 4), "input": "x"}),
                  client.get(f"/{_junk(rng, 20)}/{_junk(rng, 8)}"),
                  client.get(f"/v1/models/{name}"),
                  client.head(f"/api/blobs/sha256:{_junk(rng, 64)}")):
            assert r.status_code in (400, 404, 405), (r.status_code, r.text)

    fake_engine.enqueue("ok")
    assert client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": False}).status_code == 200
    hostile_round()  # each kind of refusal once: its series exist from here on
    client.get("/metrics")  # and the scrape's own
    before = client.get("/metrics").text
    for _ in range(1000 // 7 + 1):
        hostile_round()
    after = client.get("/metrics").text
    assert series(after) == series(before), sorted(series(after) - series(before))[:10]
    assert 'model="other"' in after and f'model="{MODEL}"' in after and 'endpoint="other"' in after
    assert 'endpoint="/api/blobs/{digest}"' in after and 'endpoint="/v1/models/{model:path}"' in after
    print(f"\n/metrics: {len(before)} bytes, {len(series(before))} series before; "
          f"{len(after)} bytes, {len(series(after))} series after 1,001 requests naming random models and paths")


# -- 5. the access log cannot be forged ------------------------------------------------------

FORGED = "x\r\nid=forged method=GET path=/ status=200\x1b[2J\x1b[31m\u2028\x7f\x85 \u202e"


def _logfmt(line: str) -> dict[str, str]:
    """The fields of one text access-log line (values bare or double-quoted)."""
    out = {}
    for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        out[m[1]] = m[2]
    return out


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_access_log_fields_carry_no_control_characters(make_client, fake_engine, caplog, log_format):
    client = make_client(log_format=log_format)
    requests = [
        lambda: client.post("/api/chat", json={"model": FORGED, "messages": CHAT}),
        lambda: client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "options": {FORGED: 1}}),
        lambda: client.get("/api/%0d%0aid=forged%20status=200%1b%5b2J%e2%80%a8"),
        lambda: client.post("/v1/chat/completions", json={"model": FORGED, "messages": CHAT}),
        lambda: client.post("/api/generate", json={"model": MODEL, "prompt": "x", "options": {"num_ctx": FORGED}}),
        lambda: client.get("/api/tags", headers={"X-Request-Id": "abc def\x1b[31m"}),
    ]
    with caplog.at_level(logging.INFO):
        for send_one in requests:
            fake_engine.enqueue("ok")
            send_one()
    lines = [r.getMessage() for r in caplog.records if r.name == "kiln.access"]
    assert len(lines) == len(requests)
    # every other line (an ignored option's warning names the key) as `kiln serve` writes it
    assert any(FORGED in r.getMessage() for r in caplog.records if r.name != "kiln.access")
    for record in caplog.records:
        assert not CONTROL_CHARS.search(SafeFormatter("%(levelname)s %(name)s: %(message)s").format(record))
    for line in lines:
        assert not CONTROL_CHARS.search(line), repr(line)
        if log_format == "json":
            fields = json.loads(line)
            assert set(fields) >= {"id", "method", "path", "status"}
        else:
            fields = _logfmt(line)
            assert fields.get("id") != "forged" and list(fields).count("status") == 1, line
    if log_format == "json":  # lossless: the values come back as they were sent
        assert json.loads(lines[0])["model"] == FORGED
        assert json.loads(lines[2])["path"] == "/api/\r\nid=forged status=200\x1b[2J\u2028"
    else:
        assert _logfmt(lines[0])["model"].startswith('"x\\x0d\\x0aid=forged ')
        assert _logfmt(lines[0])["status"] == "400"  # an invalid name
    assert re.fullmatch(r"[0-9a-f]{16}", json.loads(lines[5])["id"] if log_format == "json"
                        else _logfmt(lines[5])["id"])


@pytest.mark.parametrize("rid,kept", [("req-42", True), ("0b7c9f2e-1d2a-4c1e-9a77-3f2a1b2c3d4e", True),
                                      ("trace:abc/123=", True), ("a b", False), ("<script>", False),
                                      ("x" * 65, False), ("é", False)])
def test_request_id_charset(make_client, rid, kept):
    r = make_client().get("/api/version", headers={"X-Request-Id": rid.encode()})
    got = r.headers["x-request-id"]
    assert (got == rid) is kept and re.fullmatch(r"[A-Za-z0-9._:@/+=-]{1,64}", got)


# -- 7. kiln config masks keys ---------------------------------------------------------------

def test_kiln_config_masks_keys(monkeypatch, capsys, tmp_path):
    from server.cli import main

    monkeypatch.setenv("KILN_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("KILN_API_KEYS", f"{INFERENCE_KEY},short")
    monkeypatch.setenv("KILN_ADMIN_KEYS", ADMIN_KEY)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert INFERENCE_KEY not in out and ADMIN_KEY not in out and "short" not in out
    assert f"****{INFERENCE_KEY[-4:]},****" in out and f"****{ADMIN_KEY[-4:]}" in out
    assert "env KILN_API_KEYS" in out and "env KILN_ADMIN_KEYS" in out
