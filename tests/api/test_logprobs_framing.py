"""logprobs, logit_bias and echo at the HTTP layer, on the fake engine: an engine without
them gets a clear 400 in each dialect's shape before anything streams (OpenVINO's case);
tests/real/test_logprobs.py checks the values on llama.cpp."""

from __future__ import annotations

import pytest

MODEL = "smollm2:135m"
CHAT = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "stream": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"5": -100}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/api/chat", {"messages": CHAT, "logprobs": True}, "logprobs"),
    ("/api/generate", {"prompt": "x", "logprobs": True, "top_logprobs": 3}, "logprobs"),
])
def test_an_engine_without_them_refuses_with_400(fake_client, path, body, field):
    r = fake_client.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    message = err if isinstance(err, str) else err["message"]
    assert field in message and "fake backend" in message, message


@pytest.mark.parametrize("body,fragment", [
    ({"logprobs": 6}, "logprobs must be between 0 and 5"),
    ({"logprobs": 1, "echo": True}, "echo with logprobs"),
])
def test_completions_refusals(fake_client, body, fragment):
    r = fake_client.post("/v1/completions", json={"model": MODEL, "prompt": "x", **body})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_echo_prepends_the_prompt(fake_client, fake_engine):
    fake_engine.enqueue("world again", "world again")
    r = fake_client.post("/v1/completions", json={"model": MODEL, "prompt": "hello ", "echo": True}).json()
    assert r["choices"][0]["text"] == "hello world again"
    r = fake_client.post("/v1/completions", json={"model": MODEL, "prompt": "hello ", "echo": True, "stream": True})
    texts = [line for line in r.text.split("\n\n") if line.startswith("data: {")]
    assert '"text":"hello "' in texts[0]


def test_logprobs_flag_false_asks_for_nothing(fake_client, fake_engine):
    fake_engine.enqueue("fine")
    r = fake_client.post("/api/chat", json={"model": MODEL, "messages": CHAT, "stream": False, "logprobs": False,
                                            "top_logprobs": 3})
    assert r.status_code == 200 and "logprobs" not in r.json()
    assert fake_engine.requests[-1].sampling.logprobs is None


def test_n_choices_framing(make_client, fake_engine):
    """n sequences: one engine request each, one prefix group, seeds offset by index;
    choices carry their index, usage counts the prompt once."""
    client = make_client(num_parallel=4)
    fake_engine.enqueue("one two", "three four five")
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "n": 2, "seed": 5}).json()
    assert [(c["index"], c["message"]["content"]) for c in r["choices"]] == [(0, "one two"), (1, "three four five")]
    assert r["usage"]["completion_tokens"] == 5
    reqs = fake_engine.requests[-2:]
    assert [q.sampling.seed for q in reqs] == [5, 6] and len({q.prefix_group for q in reqs}) == 1
    fake_engine.enqueue("a b", "c d")
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "stream": True}).text
    events = [e for e in body.split("\n\n") if e.startswith("data: {")]
    assert sum('"finish_reason":"stop"' in e for e in events) == 2
    assert any('"index":1' in e for e in events)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 5})
    assert r.status_code == 400 and "KILN_NUM_PARALLEL" in r.json()["error"]["message"]
