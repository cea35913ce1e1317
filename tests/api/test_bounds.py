"""Resource bounds at the HTTP layer (fake engine): hostile templates, the memory budget,
keep_alive, blobs nothing uses, one log line per client error, store paths."""

from __future__ import annotations

import hashlib
import logging
import struct
import time

import pytest

MODEL = "smollm2:135m"
CHAT = [{"role": "user", "content": "hello"}]
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"


def _gguf(extra: bytes = b"", n_extra: int = 0, seed: str = "a") -> bytes:
    """A minimal well-formed GGUF (one tensor); ``seed`` makes distinct blobs."""
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    kvs = s("general.architecture") + struct.pack("<I", 8) + s("llama")
    kvs += s("general.name") + struct.pack("<I", 8) + s(seed)
    body = b"GGUF" + struct.pack("<IQQ", 3, 1, 2 + n_extra) + kvs + extra
    body += s("w") + struct.pack("<I", 1) + struct.pack("<Q", 32) + struct.pack("<IQ", 0, 0)
    return body + b"\0" * (-len(body) % 32) + b"\0" * 128


def _upload(client, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
    return digest


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_runaway_template_is_a_400_naming_the_limit(fake_client, path):
    r = fake_client.post("/api/create", json={"model": "loops", "from": MODEL, "template": "{{ messages }}",
                                              "stream": False})
    assert r.status_code == 200, r.text
    # the model's template is changed behind the API's back: as a GGUF's own would be
    store = fake_client.app.state.store
    m = store.get("loops")
    m.chat_template = LOOPS
    store.put(m)
    t0 = time.monotonic()
    r = fake_client.post(path, json={"model": "loops", "messages": CHAT, "stream": False})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"] if path.startswith("/v1") else r.json()["error"]
    assert "the chat template took more than" in message and "to render" in message
    assert time.monotonic() - t0 < 15
    r = fake_client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": False})
    assert r.status_code == 200


def test_create_test_renders_under_the_same_bounds(fake_client):
    r = fake_client.post("/api/create", json={"model": "boom", "from": MODEL, "template": "{{ 'a' * 10**9 }}"})
    assert r.status_code == 400, r.text  # before the first status line: a real status
    assert r.json()["error"] == "the chat template needed more than 512 MiB of memory to render"
    assert fake_client.post("/api/show", json={"model": "boom"}).status_code == 404
    r = fake_client.post("/api/generate", json={"model": MODEL, "prompt": "x", "template": "{{ 'a' * 10**9 }}",
                                                "stream": False})
    assert r.status_code == 400 and "512 MiB of memory" in r.json()["error"]


def test_a_model_over_the_memory_budget_is_a_503_with_the_numbers(make_client):
    client = make_client(memory_budget=50 << 20)
    for path in ("/api/chat", "/v1/chat/completions"):
        r = client.post(path, json={"model": MODEL, "messages": CHAT, "stream": False})
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"] if path.startswith("/v1") else r.json()["error"]
        assert message.startswith(f"model '{MODEL}' needs ")
        assert "memory budget of 0.05 GiB (KILN_MEMORY_BUDGET); loaded: none" in message
    assert client.get("/api/ps").json()["models"] == []


def test_a_huge_keep_alive_is_forever_and_ps_still_answers(fake_client):
    for keep_alive in (1e300, "99999999999h", 2**62):
        r = fake_client.post("/api/generate", json={"model": MODEL, "prompt": "hi", "keep_alive": keep_alive,
                                                    "stream": False})
        assert r.status_code == 200, r.text
        r = fake_client.get("/api/ps")
        assert r.status_code == 200, r.text
        assert r.json()["models"][0]["expires_at"].startswith("23")  # ~292 years out, as Ollama shows forever


def test_replaced_and_deleted_models_leave_no_blobs(fake_client):
    store = fake_client.app.state.store
    first, second = _upload(fake_client, _gguf(seed="first")), _upload(fake_client, _gguf(seed="second"))
    waiting = _upload(fake_client, _gguf(seed="waiting"))  # uploaded, not used yet

    def blobs() -> set[str]:
        return {p.name.replace("sha256-", "sha256:") for p in (store.root / "blobs").glob("sha256-*")}

    def create(name: str, digest: str) -> None:
        r = fake_client.post("/api/create", json={"model": name, "files": {"m.gguf": digest}, "stream": False})
        assert r.status_code == 200, r.text

    create("mine", first)
    create("shared", first)
    create("mine", second)  # replaced: first is still used by "shared"
    assert {first, second, waiting} <= blobs()
    fake_client.request("DELETE", "/api/delete", json={"model": "shared"})
    assert first not in blobs() and {second, waiting} <= blobs()
    fake_client.request("DELETE", "/api/delete", json={"model": "mine"})
    assert second not in blobs() and waiting in blobs()
    create("later", waiting)  # the upload that waited is still there to use


def test_a_gguf_with_a_ten_megabyte_array_is_cheap_to_create(fake_client):
    k = b"x.blob"
    array = struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, 8, 1_250_000) + struct.pack("<Q", 0) * 1_250_000
    digest = _upload(fake_client, _gguf(array, 1, seed="big"))
    t0 = time.monotonic()
    r = fake_client.post("/api/create", json={"model": "big", "files": {"m.gguf": digest}, "stream": False})
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 5
    info = fake_client.post("/api/show", json={"model": "big"}).json()["model_info"]
    assert "x.blob" not in info or info["x.blob"] is None


def test_a_client_error_is_one_log_line_without_a_traceback(fake_client, caplog):
    caplog.set_level(logging.INFO)
    fake_client.post("/api/show", json={"model": "nope:1b"})
    fake_client.post("/api/chat", json={"model": MODEL, "messages": "hi"})
    fake_client.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "temperature": -1})
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    access = [r.getMessage() for r in caplog.records if r.name == "kiln.access"]
    assert len(access) == 3
    assert "status=404" in access[0] and "error=" in access[0] and "model 'nope:1b' not found" in access[0]
    assert all("error=" in line for line in access)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_load_errors_name_store_paths_relative_to_the_store(fake_client):
    scheduler = fake_client.app.state.scheduler
    root = str(fake_client.app.state.store.root)
    message = scheduler.scrub(f"llama.cpp could not load {root}/blobs/sha256-{'0' * 64}")
    assert message == f"llama.cpp could not load blobs/sha256-{'0' * 64}"
    assert root not in scheduler.scrub(f"cannot open {root}")
