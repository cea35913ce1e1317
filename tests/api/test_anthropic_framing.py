"""Anthropic's Messages API on the fake engine: the exact event framing the ``anthropic``
SDK parses, the error shape on every path of ``/v1/messages``, and the translation of
content blocks, tools and stop sequences. The SDK itself reads the fake server here
(TestClient is an httpx client); tests/real/test_anthropic.py drives a real model."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest

MODEL = "smollm2:135m"
USER = [{"role": "user", "content": "hello"}]


def events(resp) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of an SSE body, checking each is ``event:`` then ``data:``."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    body = resp.text
    assert body.endswith("\n\n")
    out = []
    for ev in body.split("\n\n")[:-1]:
        lines = ev.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), ev
        name, data = lines[0][len("event: "):], json.loads(lines[1][len("data: "):])
        assert data["type"] == name, ev
        out.append((name, data))
    return out


def anthropic_error(resp, status: int, kind: str) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert body["error"]["type"] == kind and body["error"]["message"].strip(), body
    return body["error"]["message"]


def sdk(client, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url="http://localhost", api_key=kw.pop("api_key", "unused"), http_client=client,
                               max_retries=0, **kw)


def test_stream_event_sequence(fake_client, fake_engine):
    fake_engine.enqueue("The quick brown fox.")
    r = fake_client.post("/v1/messages", json={"model": MODEL, "max_tokens": 50, "messages": USER, "stream": True})
    evs = events(r)
    names = [n for n, _ in evs]
    assert names == ["message_start", "ping", "content_block_start"] + ["content_block_delta"] * 4 + [
        "content_block_stop", "message_delta", "message_stop"]
    start = evs[0][1]["message"]
    assert start["id"].startswith("msg_") and start["role"] == "assistant" and start["content"] == []
    assert start["model"] == MODEL and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert evs[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta")
    assert text == "The quick brown fox."
    assert all(d["delta"]["type"] == "text_delta" and d["index"] == 0 for n, d in evs if n == "content_block_delta")
    delta = evs[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4


def test_non_stream_message_shape(fake_client, fake_engine):
    fake_engine.enqueue("Hi there.")
    r = fake_client.post("/v1/messages", json={"model": MODEL, "max_tokens": 50, "messages": USER})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == MODEL
    assert body["content"] == [{"type": "text", "text": "Hi there."}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"]["output_tokens"] == 2 and body["usage"]["input_tokens"] > 0


def test_max_tokens_and_stop_sequence(fake_client, fake_engine):
    fake_engine.enqueue("one two three four five", "alpha beta END gamma")
    r = fake_client.post("/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": USER}).json()
    assert r["stop_reason"] == "max_tokens" and r["content"][0]["text"] == "one two"
    r = fake_client.post("/v1/messages", json={"model": MODEL, "max_tokens": 20, "messages": USER,
                                               "stop_sequences": ["END"]}).json()
    assert r["stop_reason"] == "stop_sequence" and r["stop_sequence"] == "END"
    assert r["content"][0]["text"] == "alpha beta "  # cut right before the stop string
    assert fake_engine.requests[-1].sampling.stop == ["END"]


def test_sdk_parses_create_and_stream(fake_client, fake_engine):
    fake_engine.enqueue("Hello from kiln.", "Streamed reply here.")
    client = sdk(fake_client)
    msg = client.messages.create(model=MODEL, max_tokens=30, messages=USER)
    assert msg.content[0].text == "Hello from kiln." and msg.stop_reason == "end_turn"
    with client.messages.stream(model=MODEL, max_tokens=30, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Streamed reply here." == final.content[0].text
    assert final.usage.output_tokens == 3


TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_use_streamed_and_whole(fake_client, fake_engine):
    fake_engine.enqueue(CALL, CALL)
    client = sdk(fake_client)
    msg = client.messages.create(model=MODEL, max_tokens=60, messages=USER, tools=TOOLS)
    assert msg.stop_reason == "tool_use"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    with client.messages.stream(model=MODEL, max_tokens=60, messages=USER, tools=TOOLS) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris"}
    # the definitions reached the prompt as functions
    assert "get_weather" in fake_engine.requests[-1].prompt


def test_tool_round_trip_history(fake_client, fake_engine):
    """A tool_use turn and its tool_result become the call and the tool message the
    template renders."""
    fake_engine.enqueue("It is sunny.")
    messages = [*USER,
                {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                                  {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": [{"type": "text", "text": "sunny, 21C"}]}]}]
    r = fake_client.post("/v1/messages", json={"model": MODEL, "max_tokens": 20, "messages": messages,
                                               "tools": TOOLS, "system": [{"type": "text", "text": "Be brief."}]})
    assert r.status_code == 200, r.text
    prompt = fake_engine.requests[-1].prompt
    assert "Be brief." in prompt and '"city": "Paris"' in prompt and "sunny, 21C" in prompt


def test_forced_tool_choice_reaches_the_grammar(fake_client, fake_engine):
    fake_engine.enqueue('{"name": "get_weather", "arguments": {"city": "Rome"}}')
    r = fake_client.post("/v1/messages", json={"model": MODEL, "max_tokens": 60, "messages": USER, "tools": TOOLS,
                                               "tool_choice": {"type": "tool", "name": "get_weather"}}).json()
    assert r["stop_reason"] == "tool_use" and r["content"][-1]["input"] == {"city": "Rome"}
    assert fake_engine.requests[-1].json_schema["properties"]["name"] == {"const": "get_weather"}


@pytest.mark.parametrize("body,fragment", [
    ({"model": MODEL, "messages": USER}, "max_tokens"),
    ({"model": MODEL, "max_tokens": 0, "messages": USER}, "max_tokens"),
    ({"model": MODEL, "max_tokens": 8, "messages": []}, "messages"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"model": MODEL, "max_tokens": 8, "messages": USER, "temperature": 1.5}, "temperature"),
    ({"model": MODEL, "max_tokens": 8, "messages": USER, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"model": MODEL, "max_tokens": 8, "messages": USER, "tools": [{"type": "web_search_20250305",
                                                                    "name": "web_search"}]}, "server tool"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "document"),
    ({"model": MODEL, "max_tokens": 8, "messages": USER, "stream": "yes"}, "stream"),
    ({"model": MODEL, "max_tokens": 8, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 1024}},
     "thinking"),
])
def test_invalid_requests_are_anthropic_400s(fake_client, body, fragment):
    assert fragment in anthropic_error(fake_client.post("/v1/messages", json=body), 400, "invalid_request_error")


def test_unknown_model_and_bad_json(fake_client):
    anthropic_error(fake_client.post("/v1/messages", json={"model": "nope:1b", "max_tokens": 8, "messages": USER,
                                                           "stream": True}), 404, "not_found_error")
    r = fake_client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    anthropic_error(r, 400, "invalid_request_error")
    with pytest.raises(anthropic.NotFoundError):
        sdk(fake_client).messages.create(model="nope:1b", max_tokens=8, messages=USER)


def test_mid_stream_error_is_an_error_event(make_client, fake_engine):
    client = make_client(engine={"fail_at": 2})
    fake_engine.enqueue("one two three four")
    evs = events(client.post("/v1/messages", json={"model": MODEL, "max_tokens": 20, "messages": USER,
                                                   "stream": True}))
    name, data = evs[-1]
    assert name == "error" and data["error"]["type"] == "api_error" and data["error"]["message"]
    assert "message_stop" not in [n for n, _ in evs]
    with pytest.raises(anthropic.APIStatusError):
        fake_engine.enqueue("one two three four")
        with sdk(client).messages.stream(model=MODEL, max_tokens=20, messages=USER) as stream:
            list(stream.text_stream)


def test_count_tokens(fake_client, fake_engine):
    r = fake_client.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": USER, "tools": TOOLS})
    assert r.status_code == 200, r.text
    n = r.json()["input_tokens"]
    assert isinstance(n, int) and n > 0
    bare = fake_client.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": USER}).json()
    assert bare["input_tokens"] < n  # the tool definitions are in the prompt
    assert sdk(fake_client).messages.count_tokens(model=MODEL, messages=USER).input_tokens == bare["input_tokens"]
    anthropic_error(fake_client.post("/v1/messages/count_tokens", json={"model": "nope:1b", "messages": USER}),
                    404, "not_found_error")


def test_keys_by_x_api_key_or_bearer(make_client, fake_engine):
    client = make_client(api_keys=["sekrit"])
    assert "API key" in anthropic_error(client.post("/v1/messages", json={"model": MODEL, "max_tokens": 8,
                                                                          "messages": USER}),
                                        401, "authentication_error")
    fake_engine.enqueue("ok one", "ok two")
    assert sdk(client, api_key="sekrit").messages.create(model=MODEL, max_tokens=8, messages=USER).content
    assert sdk(client, api_key=None, auth_token="sekrit").messages.create(model=MODEL, max_tokens=8,
                                                                          messages=USER).content
    with pytest.raises(anthropic.AuthenticationError):
        sdk(client, api_key="wrong").messages.create(model=MODEL, max_tokens=8, messages=USER)
