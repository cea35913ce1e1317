"""Token-id inputs at the HTTP layer, on the fake engine: ``/v1/completions`` ``prompt``
and ``/v1/embeddings`` ``input`` as token ids reach the engine as they are (no text in
between), ids outside the vocabulary are an OpenAI-shaped 400 naming the id, and the
forms kiln does not take are refused by name. tests/real/test_token_inputs.py runs them
on llama.cpp. Also here: an engine that gives no top_logprobs alternatives (OpenVINO's
case) refuses top_logprobs > 0 with a 400 naming it."""

from __future__ import annotations

import json

import pytest

from backends.base import Capabilities

MODEL = "smollm2:135m"
VOCAB = {"info": {"n_vocab": 100}}


@pytest.fixture
def client(make_client):
    return make_client(engine=VOCAB)


def _error(r) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error", err  # OpenAI's shape
    return err["message"]


@pytest.mark.parametrize("prompt", [[5, 7, 9], [[5, 7, 9]]])
def test_completion_ids_reach_the_engine_as_they_are(client, fake_engine, prompt):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3})
    assert r.status_code == 200, r.text
    req = fake_engine.requests[-1]
    assert req.tokens == [5, 7, 9] and req.prompt == ""
    assert r.json()["usage"]["prompt_tokens"] == 3


def test_completion_ids_stream(client, fake_engine):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    assert fake_engine.requests[-1].tokens == [1, 2]


@pytest.mark.parametrize("prompt,named", [([3, 100], "token id 100"), ([[-1, 4]], "token id -1"),
                                          ([99, 12345], "token id 12345")])
def test_ids_outside_the_vocabulary_are_a_400_naming_the_id(client, fake_engine, prompt, named):
    message = _error(client.post("/v1/completions", json={"model": MODEL, "prompt": prompt}))
    assert named in message and "0..99" in message, message
    assert not fake_engine.requests  # nothing reached the engine
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2]})  # and it goes on serving
    assert ok.status_code == 200


@pytest.mark.parametrize("prompt,fragment", [
    ([12, "text"], "mixing token ids and strings"),
    ([[12, "text"]], "mixing token ids and strings"),
    ([], "empty list"),
    ([[]], "token list is empty"),
    ([1.5], "must be a string or a list of token ids"),
    ([True, 2], "must be a string or a list of token ids"),
    ({"a": 1}, "prompt"),
])
def test_forms_kiln_does_not_take(client, prompt, fragment):
    message = _error(client.post("/v1/completions", json={"model": MODEL, "prompt": prompt}))
    assert fragment in message, message


def test_several_prompts_are_choices_in_their_order(client, fake_engine):
    """OpenAI's list of prompts: prompt i's choice j is choice i * n + j, usage their sum."""
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 7], "two", [9]], "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    sent = fake_engine.requests[-3:]  # each prompt its own engine request, as they are
    assert sorted(q.prompt for q in sent) == ["", "", "two"]
    assert sorted(q.tokens for q in sent if not q.prompt) == [[5, 7], [9]]
    alone = [client.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 3}).json()
             for p in ([5, 7], "two", [9])]
    assert [c["text"] for c in body["choices"]] == [a["choices"][0]["text"] for a in alone]
    for key in ("prompt_tokens", "completion_tokens"):
        assert body["usage"][key] == sum(a["usage"][key] for a in alone)


def test_several_prompts_stream_each_choice_with_its_index(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["one", "two"], "n": 2, "stream": True,
                                             "max_tokens": 3, "echo": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    texts: dict[int, str] = {}
    finished = set()
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finished.add(c["index"])
    assert finished == {0, 1, 2, 3}
    assert [texts[i].startswith(p) for i, p in enumerate(["one", "one", "two", "two"])] == [True] * 4


def test_one_bad_prompt_of_several_is_a_400_before_anything_is_sent(client, fake_engine):
    message = _error(client.post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2], [3, 100]],
                                                          "stream": True}))
    assert "token id 100" in message, message


def test_too_many_prompts(client):
    message = _error(client.post("/v1/completions", json={"model": MODEL, "prompt": ["x"] * 65}))
    assert "at most 64 prompts" in message, message


@pytest.mark.parametrize("extra,fragment", [({"echo": True}, "echo needs the prompt as text"),
                                            ({"suffix": "x"}, "suffix needs the prompt as text")])
def test_what_needs_the_prompt_as_text(client, extra, fragment):
    message = _error(client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], **extra}))
    assert fragment in message, message


def test_an_engine_without_a_vocabulary_size_refuses_ids(fake_client):
    message = _error(fake_client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2]}))
    assert "vocabulary size" in message, message


@pytest.mark.parametrize("value,count", [([1, 2, 3], 1), ([[1, 2], [3]], 2), (["a", [3]], 2)])
def test_embedding_ids(client, value, count):
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": value})
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == list(range(count))


@pytest.mark.parametrize("value,fragment", [([1, 100], "token id 100"), ([[1], [-5]], "token id -5"),
                                            ([[1, "a"]], "mixing"), ([[]], "empty")])
def test_embedding_refusals(client, value, fragment):
    message = _error(client.post("/v1/embeddings", json={"model": MODEL, "input": value}))
    assert fragment in message, message


@pytest.fixture
def sampled_only(make_client):
    """An engine that gives each sampled token's log-probability and no alternatives."""
    return make_client(engine={"info": {"capabilities": Capabilities(logprobs=True,
                                                                     max_top_logprobs=0)}})


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1}),
    ("/api/generate", {"prompt": "hi", "logprobs": True, "top_logprobs": 3}),
])
def test_top_logprobs_refused_where_the_engine_gives_none(sampled_only, path, body):
    r = sampled_only.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    message = err if isinstance(err, str) else err["message"]
    assert "top_logprobs" in message and "fake backend" in message and "sampled token" in message, message


def test_sampled_token_logprobs_pass_where_the_engine_gives_them(sampled_only, fake_engine):
    r = sampled_only.post("/v1/chat/completions", json={"model": MODEL, "logprobs": True,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert fake_engine.requests[-1].sampling.logprobs == 0
