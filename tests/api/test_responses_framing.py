"""OpenAI's Responses API on the fake engine: the event framing ``responses.stream``
accumulates, the object ``responses.create`` parses, stateless refusals, and the
translation of input items and tools. The openai SDK reads the fake server here;
tests/real/test_responses.py drives a real model."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

MODEL = "smollm2:135m"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def events(resp) -> list[tuple[str, dict[str, Any]]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for ev in resp.text.split("\n\n")[:-1]:
        name, data = ev.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), ev
        obj = json.loads(data[len("data: "):])
        assert obj["type"] == name[len("event: "):]
        out.append((obj["type"], obj))
    assert [d["sequence_number"] for _, d in out] == list(range(len(out)))
    return out


def sdk(client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)


def test_stream_event_sequence(fake_client, fake_engine):
    fake_engine.enqueue("The quick brown fox.")
    evs = events(fake_client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}))
    assert [n for n, _ in evs] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 4, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    rid = evs[0][1]["response"]["id"]
    assert rid.startswith("resp_") and all(d["response"]["id"] == rid for n, d in evs if "response" in d)
    done = evs[-1][1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "The quick brown fox."
    assert done["usage"]["output_tokens"] == 4 and done["usage"]["input_tokens"] > 0


def test_sdk_create_and_stream(fake_client, fake_engine):
    fake_engine.enqueue("Hello there.", "Streamed words here.")
    client = sdk(fake_client)
    r = client.responses.create(model=MODEL, input="hi", instructions="Be brief.")
    assert r.output_text == "Hello there." and r.status == "completed" and r.usage.output_tokens == 2
    assert fake_engine.requests[-1].prompt.count("Be brief.") == 1
    with client.responses.stream(model=MODEL, input=[{"role": "user", "content": "hi"}]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Streamed words here." == final.output_text


def test_function_call_round_trip(fake_client, fake_engine):
    fake_engine.enqueue(CALL, CALL, "It is sunny.")
    client = sdk(fake_client)
    r = client.responses.create(model=MODEL, input="weather in Paris?", tools=TOOLS)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    with client.responses.stream(model=MODEL, input="weather in Paris?", tools=TOOLS) as stream:
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["function_call"]
    r2 = client.responses.create(model=MODEL, tools=TOOLS, input=[
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}])
    assert r2.output_text == "It is sunny."
    prompt = fake_engine.requests[-1].prompt
    assert "sunny, 21C" in prompt and '"city": "Paris"' in prompt


def test_text_format_json_schema_and_max_output_tokens(fake_client, fake_engine):
    fake_engine.enqueue('{"a": 1}', "one two three four")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = fake_client.post("/v1/responses", json={"model": MODEL, "input": "x", "text": {
        "format": {"type": "json_schema", "name": "thing", "schema": schema}}}).json()
    assert fake_engine.requests[-1].json_schema == schema and r["text"]["format"]["name"] == "thing"
    r = fake_client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 2}).json()
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r["output"][0]["content"][0]["text"] == "one two"


@pytest.mark.parametrize("body,fragment", [
    ({"model": MODEL, "input": "x", "previous_response_id": "resp_abc"}, "previous_response_id"),
    ({"model": MODEL, "input": "x", "conversation": "conv_1"}, "conversation"),
    ({"model": MODEL, "input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"model": MODEL, "input": ""}, "input"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, "function tools"),
    ({"model": MODEL, "input": "x", "temperature": 3}, "temperature"),
    ({"model": MODEL, "input": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"model": MODEL, "input": "x", "stream": "yes"}, "stream"),
    ({"input": "x"}, "model"),
])
def test_invalid_requests_are_openai_400s(fake_client, body, fragment):
    r = fake_client.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and fragment in err["message"], err


def test_previous_response_id_through_the_sdk(fake_client):
    with pytest.raises(openai.BadRequestError, match="stateless"):
        sdk(fake_client).responses.create(model=MODEL, input="x", previous_response_id="resp_1")


def test_mid_stream_failure(make_client, fake_engine):
    client = make_client(engine={"fail_at": 2})
    fake_engine.enqueue("one two three four")
    evs = events(client.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True}))
    name, data = evs[-1]
    assert name == "response.failed" and data["response"]["status"] == "failed"
    assert data["response"]["error"]["message"]
