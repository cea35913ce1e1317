"""litellm, unmodified, against a real ``kiln serve`` on the bundled model: its
``ollama_chat/`` provider (``/api/chat``) and its ``ollama/`` provider (``/api/generate``),
whole and streamed, as aider and smolagents' LiteLLMModel use them. litellm POSTs its
JSON bodies without a ``Content-Type`` header (Ollama reads them as JSON anyway); before
issue 12 kiln answered every one of these calls with a 400.

litellm fetches its model-cost map from the web at import unless told to use the copy
it ships (``LITELLM_LOCAL_MODEL_COST_MAP``); the test sets it, as an offline user must.
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator

import httpx
import pytest

pytestmark = [pytest.mark.real_model,
              # litellm's pydantic types warn about ReadOnly TypedDict items on first use
              pytest.mark.filterwarnings("ignore::UserWarning")]

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")
if os.environ.get("KILN_REQUIRE_REAL"):
    import litellm  # CI: a missing litellm is a failure, not a skip
else:
    litellm = pytest.importorskip("litellm")

MODEL = "smollm2:135m"
COUNT = [{"role": "user", "content": "Count from one to ten."}]
GREEDY = {"temperature": 0}


def test_ollama_chat_provider(server):
    r = litellm.completion(model=f"ollama_chat/{MODEL}", messages=COUNT, api_base=server.url, max_tokens=8, **GREEDY)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0


def test_ollama_chat_provider_stream(server):
    chunks = list(litellm.completion(model=f"ollama_chat/{MODEL}", messages=COUNT, api_base=server.url,
                                     max_tokens=10, stream=True, **GREEDY))
    assert len(chunks) >= 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # the same greedy request, whole, says the same
    whole = litellm.completion(model=f"ollama_chat/{MODEL}", messages=COUNT, api_base=server.url, max_tokens=10,
                               **GREEDY)
    assert whole.choices[0].message.content == text


def test_ollama_generate_provider_whole_and_streamed(server):
    prompt = [{"role": "user", "content": "Name a color."}]
    whole = litellm.completion(model=f"ollama/{MODEL}", messages=prompt, api_base=server.url, max_tokens=6, **GREEDY)
    text = whole.choices[0].message.content
    assert text.strip() and 0 < whole.usage.completion_tokens <= 6
    chunks = list(litellm.completion(model=f"ollama/{MODEL}", messages=prompt, api_base=server.url, max_tokens=6,
                                     stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_ollama_embedding(server):
    r = litellm.embedding(model=f"ollama/{MODEL}", input=["a cat", "a dog"], api_base=server.url)
    assert [len(d["embedding"]) for d in r.data] == [576, 576]


def test_a_missing_model_is_an_error_litellm_raises(server):
    with pytest.raises(Exception) as e:  # litellm maps Ollama's 404 onto its own exception classes
        litellm.completion(model="ollama_chat/no-such-model:1b", messages=COUNT, api_base=server.url, max_tokens=4)
    assert "not found" in str(e.value)


# -- litellm's requests, seen on the wire -----------------------------------------------------

class Recorder(http.server.BaseHTTPRequestHandler):
    """Passes each request to kiln and keeps its headers: the test proves litellm still
    sends no Content-Type (else the cases above would prove nothing)."""

    target = ""
    seen: list[tuple[str, dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        r = httpx.post(self.target + self.path, content=body, headers=headers, timeout=300)
        self.send_response(r.status_code)
        self.send_header("Content-Type", r.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder(server) -> Iterator[str]:
    Recorder.target, Recorder.seen = server.url, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_litellm_sends_no_content_type(recorder):
    litellm.completion(model=f"ollama_chat/{MODEL}", messages=COUNT, api_base=recorder, max_tokens=4, **GREEDY)
    litellm.completion(model=f"ollama/{MODEL}", messages=COUNT, api_base=recorder, max_tokens=4, **GREEDY)
    paths = [p for p, _ in Recorder.seen]
    assert {"/api/chat", "/api/generate"} <= set(paths), paths  # (litellm asks /api/show too)
    for path, headers in Recorder.seen:
        if path != "/api/show":  # (its model-info lookup sends JSON's header)
            assert "content-type" not in headers, (path, headers)
