"""The context a real client's first request needs, on a real ``kiln serve`` at default
settings (no KILN_CONTEXT_LENGTH, no num_ctx in the requests), the bundled model on
llama.cpp. Open WebUI's first chat is ~7,000 tokens (its 36 built-in tools): it must be
answered on both dialects, as plain text and as that chat's own shape (tests/openwebui.py); a 9,000-token prompt, over the model's trained 8,192, must be
refused in the words OpenClaw and OpenAI clients recognise; the context given back by
/api/generate must carry the conversation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import json

import httpx
import openai
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.openwebui import first_chat

pytestmark = pytest.mark.real_model

MODEL = "smollm2:135m"
TRAINED = 8192
TOKENS_PER_LINE = 29.4  # the bundled tokenizer on one tool line below (measured)


def agent_messages(tokens: int) -> list[dict[str, str]]:
    docs = "\n".join(f"Tool {i}: fetch_record_{i}(id: str) returns the record number {i} from the archive."
                     for i in range(int(tokens / TOKENS_PER_LINE)))
    return [{"role": "system", "content": "You are an agent with these tools:\n" + docs},
            {"role": "user", "content": "Which tool fetches record 7? Answer with its name."}]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("ctx"), env={"KILN_LOG_LEVEL": "info"})
    yield s
    stop_server(s)


# A cold 7,000-token prompt takes about 30 s on two idle cores (llama.cpp); on a machine
# shared with other work it can take ten times that.
@pytest.mark.timeout(2400)
def test_7000_token_prompt_is_answered_on_both_dialects(default_server):
    messages = agent_messages(7000)
    r = httpx.post(default_server.url + "/api/chat", timeout=2300, json={
        "model": MODEL, "messages": messages, "stream": False, "options": {"num_predict": 8, "temperature": 0}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 6500 < body["prompt_eval_count"] < TRAINED and body["done"], body
    ps = httpx.get(default_server.url + "/api/ps").json()["models"][0]
    assert ps["context_length"] == TRAINED
    assert httpx.post(default_server.url + "/api/show", json={"model": MODEL}).json()["kiln"]["context_length"] == TRAINED

    # The same conversation through the OpenAI SDK: no way to ask for a context there, and
    # none needed (the prefix is cached from the request above, so this one is quick).
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", timeout=600, max_retries=0)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert 6500 < out.usage.prompt_tokens < TRAINED
    assert out.choices[0].finish_reason in ("stop", "length")


# Open WebUI 0.12's first chat, as it sends it at default settings (tests/openwebui.py):
# 36 tools, streamed, nothing about the context. Open WebUI sends no length limit either;
# here the answer is bounded, so that the test's time is the prompt's.
@pytest.mark.timeout(2400)
def test_open_webui_first_chat_with_36_tools_on_both_dialects(default_server):
    body = {**first_chat(MODEL), "options": {"num_predict": 48}}
    assert len(body["tools"]) == 36
    with httpx.stream("POST", default_server.url + "/api/chat", json=body, timeout=2300) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    *chunks, final = lines
    assert "error" not in final and final["done"] is True, final
    assert 6500 < final["prompt_eval_count"] < TRAINED, final
    answered = "".join(c["message"].get("content", "") for c in lines) or [
        c["message"]["tool_calls"] for c in lines if c["message"].get("tool_calls")]
    assert answered, lines  # an answer, or a call of one of the tools
    assert final["done_reason"] in ("stop", "length")

    # Open WebUI's OpenAI connection sends the same body to /v1 (the prefix is cached now)
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", timeout=600, max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=body["messages"], tools=body["tools"], stream=True,
                                            max_tokens=48, stream_options={"include_usage": True})
    out = list(stream)
    assert 6500 < out[-1].usage.prompt_tokens < TRAINED
    finish = [c.choices[0].finish_reason for c in out if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length", "tool_calls")
    assert any(c.choices and (c.choices[0].delta.content or c.choices[0].delta.tool_calls) for c in out)


def test_9000_token_prompt_is_refused_in_the_words_clients_know(default_server):
    messages = agent_messages(9000)
    r = httpx.post(default_server.url + "/api/chat", timeout=120, json={"model": MODEL, "messages": messages})
    assert r.status_code == 400
    msg = r.json()["error"]
    assert msg.startswith("the input length exceeds the context length"), msg  # Ollama's wording
    assert f"the context window {TRAINED} tokens" in msg and f"trained maximum {TRAINED}" in msg

    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert f"maximum context length is {TRAINED} tokens" in e.value.message


def test_num_ctx_above_the_trained_context_is_said_not_advised(default_server):
    log = Path(default_server.log)
    before = log.read_text()
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=agent_messages(9000), max_tokens=8,
                                       extra_body={"num_ctx": 16384})
    assert "asked for num_ctx 16384, more than the model was trained for" in e.value.message
    assert "raise num_ctx" not in e.value.message
    new = log.read_text()[len(before):]
    assert "num_ctx 16384 asked; using 8192: the model was trained for 8192 tokens" in new, new[-2000:]


def test_generate_context_carries_the_conversation(default_server):
    url = default_server.url + "/api/generate"
    first = httpx.post(url, timeout=120, json={
        "model": MODEL, "prompt": "My name is Ada. Remember it.", "stream": False,
        "options": {"num_predict": 12, "temperature": 0}}).json()
    ctx = first["context"]
    # prompt and answer tokenized together (a token may merge across their boundary)
    assert abs(len(ctx) - (first["prompt_eval_count"] + first["eval_count"])) <= 2, (len(ctx), first)
    second = httpx.post(url, timeout=120, json={
        "model": MODEL, "prompt": "What is my name?", "context": ctx, "stream": False,
        "options": {"num_predict": 12, "temperature": 0}}).json()
    # the earlier exchange is in the prompt: it counts (and is mostly cached)
    assert second["prompt_eval_count"] > len(ctx)
    assert len(second["context"]) > len(ctx)
