"""The official ``openai`` SDK's Responses API (``responses.create``, ``responses.stream``)
against a real ``kiln serve`` on the bundled SmolLM2-135M. Bounded generations; no timings."""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.real_model

MODEL = "smollm2:135m"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Get the current weather of a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


def test_create_and_stream_agree(oa):
    kw = dict(model=MODEL, instructions="You are terse.", input="Count to five.", max_output_tokens=20,
              temperature=0)
    whole = oa.responses.create(**kw)
    assert whole.status in ("completed", "incomplete") and whole.output_text.strip()
    assert 0 < whole.usage.output_tokens <= 20 and whole.usage.input_tokens > 0
    with oa.responses.stream(**{**kw, "max_output_tokens": 200}) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and text == final.output_text
    assert final.output_text.startswith(whole.output_text)  # greedy: the longer run extends the shorter


def test_function_call_round_trip(oa):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oa.responses.create(model=MODEL, input=ask, tools=TOOLS, temperature=0, max_output_tokens=64,
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments).get("city"), str)
    second = oa.responses.create(model=MODEL, tools=TOOLS, temperature=0, max_output_tokens=40, input=[
        *ask, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees Celsius."}])
    assert second.output and second.usage.input_tokens > first.usage.input_tokens


def test_json_schema_output(oa):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = oa.responses.create(model=MODEL, input="Invent a person.", temperature=0, max_output_tokens=60,
                            text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                             "strict": True}})
    person = json.loads(r.output_text)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_previous_response_id_is_refused(oa):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oa.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
