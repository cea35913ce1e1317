"""The npm ``ollama`` and ``openai`` packages (pinned in tests/js/package-lock.json) on
Node against a real ``kiln serve`` on the bundled model: what a JavaScript app, or Open
WebUI's and OpenClaw's Node-side cousins, see. tests/js/clients.mjs drives each client
as its README does and prints what the client returned, as the client parsed it; the
checks are here.

``npm ci`` runs once per lockfile (node_modules/ in tests/js is kept, gitignored, with a
stamp of the lockfile it was installed from). Skipped when ``node`` is missing, unless
``KILN_REQUIRE_REAL=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.real_model

JS = Path(__file__).resolve().parent.parent / "js"
MODEL = "smollm2:135m"
EMBED_DIM = 576


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        if os.environ.get("KILN_REQUIRE_REAL"):
            pytest.fail("node and npm are needed for the npm client tests (apt-get install nodejs npm)")
        pytest.skip("node is not installed")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v").split(".")[0])
    assert major >= 20, f"node {major}: the pinned clients need Node 20 or later"
    lock = hashlib.sha256((JS / "package-lock.json").read_bytes()).hexdigest()
    stamp = JS / "node_modules" / ".kiln-lock-sha256"
    if not stamp.exists() or stamp.read_text() != lock:
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        stamp.write_text(lock)
    return node


def run(node: str, server, case: str) -> dict[str, Any]:
    r = subprocess.run([node, "clients.mjs", case, server.url], cwd=JS, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


# -- ollama ------------------------------------------------------------------------------

def test_ollama_list_ps_version(node, server):
    out = run(node, server, "ollama-list")
    assert MODEL in out["names"]
    assert out["details"]["format"] == "gguf" and out["details"]["family"]
    assert isinstance(out["ps"]["models"], list)
    assert out["version"]["version"]


def test_ollama_show(node, server):
    out = run(node, server, "ollama-show")
    assert "completion" in out["capabilities"] and out["template"] == "string"


def test_ollama_chat(node, server):
    r = run(node, server, "ollama-chat")
    assert r["done"] is True and r["model"] == MODEL
    assert r["message"]["role"] == "assistant" and r["message"]["content"].strip()
    assert 0 < r["eval_count"] <= 8 and r["prompt_eval_count"] > 0
    assert r["done_reason"] in ("stop", "length")


def test_ollama_chat_stream(node, server):
    *chunks, final = run(node, server, "ollama-chat-stream")["parts"]
    assert len(chunks) >= 2 and all(p["done"] is False for p in chunks)
    assert final["done"] is True and 0 < final["eval_count"] <= 10 and final["done_reason"] in ("stop", "length")
    assert "".join(p["message"]["content"] for p in chunks).strip()


def test_ollama_generate(node, server):
    out = run(node, server, "ollama-generate")
    whole, parts = out["whole"], out["parts"]
    assert whole["done"] is True and whole["response"].strip() and 0 < whole["eval_count"] <= 6
    assert isinstance(whole["context"], list) and whole["context"]
    # the same greedy request, streamed, says the same
    assert "".join(p["response"] for p in parts) == whole["response"]
    assert parts[-1]["done"] is True and parts[-1]["eval_count"] == whole["eval_count"]


def test_ollama_embed(node, server):
    out = run(node, server, "ollama-embed")
    assert out["count"] == 2 and out["dims"] == [EMBED_DIM, EMBED_DIM] and out["legacy_dim"] == EMBED_DIM
    assert out["prompt_eval_count"] > 0


def test_ollama_error_is_a_response_error(node, server):
    threw = run(node, server, "ollama-error")["threw"]
    assert threw["class"] == "ResponseError" and threw["status_code"] == 404
    assert "not found" in threw["error"]


# -- openai ------------------------------------------------------------------------------

def test_openai_models(node, server):
    out = run(node, server, "openai-models")
    assert MODEL in out["ids"]
    assert out["one"]["id"] == MODEL and out["one"]["object"] == "model"


def test_openai_chat(node, server):
    r = run(node, server, "openai-chat")
    assert r["object"] == "chat.completion" and r["model"] == MODEL
    choice = r["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    assert 0 < r["usage"]["completion_tokens"] <= 8 and r["usage"]["prompt_tokens"] > 0


def test_openai_chat_stream(node, server):
    chunks = run(node, server, "openai-chat-stream")["chunks"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    with_choice = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choice).strip()
    assert with_choice[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    usage = chunks[-1]["usage"]  # stream_options.include_usage: a last chunk with no choices
    assert chunks[-1]["choices"] == [] and 0 < usage["completion_tokens"] <= 10


def test_openai_completion(node, server):
    r = run(node, server, "openai-completion")
    assert r["object"] == "text_completion" and r["choices"][0]["text"].strip()
    assert 0 < r["usage"]["completion_tokens"] <= 6


def test_openai_embeddings(node, server):
    # the SDK asks for base64 and decodes it into floats
    out = run(node, server, "openai-embeddings")
    assert out["object"] == "list" and out["count"] == 2 and out["dims"] == [EMBED_DIM, EMBED_DIM]
    assert out["usage"]["prompt_tokens"] > 0


def test_openai_errors_are_typed(node, server):
    bad = run(node, server, "openai-error")["threw"]
    assert bad["class"] == "BadRequestError" and bad["status"] == 400 and bad["type"] == "invalid_request_error"
    assert "max_tokens" in bad["message"]
    missing = run(node, server, "openai-missing-model")["threw"]
    assert missing["class"] == "NotFoundError" and missing["status"] == 404
