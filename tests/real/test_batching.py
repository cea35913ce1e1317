"""Issue 3 on the real model: concurrent requests with different options each get what
they would get alone in kind, cached prefixes are reported honestly, and a request
that waits in the queue is answered in order."""

import concurrent.futures as cf
import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.real_model
MODEL = "smollm2:135m"


def chat(server, body: dict) -> dict:
    r = httpx.post(server.url + "/api/chat", json={"model": MODEL, "stream": False, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_requests_keep_their_own_options(server):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    jobs = {
        "short": {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
                  "options": {"num_predict": 3, "seed": 1, "temperature": 0.9}},
        "stop": {"messages": [{"role": "user", "content": "Count from one to ten."}],
                 "options": {"num_predict": 40, "temperature": 0, "stop": ["3."]}},
        "json": {"messages": [{"role": "user", "content": "Pick a colour."}], "format": schema,
                 "options": {"num_predict": 30, "seed": 7, "temperature": 0.7}},
        "long": {"messages": [{"role": "user", "content": "Describe the sea."}],
                 "options": {"num_predict": 24, "seed": 3, "temperature": 0.8}},
    }
    with cf.ThreadPoolExecutor(4) as pool:
        out = dict(zip(jobs, pool.map(lambda b: chat(server, b), jobs.values())))
    assert out["short"]["eval_count"] <= 3 and out["short"]["done_reason"] == "length"
    assert "3." not in out["stop"]["message"]["content"] and out["stop"]["done_reason"] == "stop"
    assert json.loads(out["json"]["message"]["content"])["colour"] in ("red", "green", "blue")
    assert out["long"]["eval_count"] <= 24
    # the same requests alone: the same kind of result
    alone = chat(server, jobs["stop"])
    assert alone["done_reason"] == "stop" and "3." not in alone["message"]["content"]


def test_prefix_reuse_is_reported_and_counts_stay_honest(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    system = "You are a support agent for the Kiln company. " + " ".join(
        f"Rule {i}: answer politely and mention policy number {i}." for i in range(60))
    first = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "Hello!"}])
    second = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And what about refunds?"}])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 2  # the whole first prompt came from the cache
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # reported in full, not minus the cache
    r = httpx.post(server.url + "/api/chat", timeout=120, json={
        "model": MODEL, "stream": False, "options": {"num_predict": 5, "temperature": 0},
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}]}).json()
    assert r["prompt_eval_count"] == first.usage.prompt_tokens  # Ollama's count: the prompt, cached or not
