"""Issue 5's must-shows on the bundled 135M model, through the official clients:
schema-valid JSON and forced tool calls 20 of 20, the loop guard, long prompts, and
LangChain tool-call round trips. ``make test`` runs them on llama.cpp and again on
OpenVINO's CPU pipeline (``KILN_CONFORMANCE_BACKEND=openvino-cpu``, tests/real/conftest.py)."""

import json
import os

import httpx
import jsonschema
import ollama
import openai
import pytest

from tests.schemas import PERSON

pytestmark = pytest.mark.real_model
MODEL = "smollm2:135m"
BACKEND = os.environ.get("KILN_CONFORMANCE_BACKEND", "llamacpp")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
PROMPTS = [f"Describe person number {i}: someone who lives in {c}." for i, c in
           enumerate(["Paris", "Oslo", "Lima", "Kyoto", "Cairo"] * 4)]


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ol(server):
    return ollama.Client(host=server.url)


def test_json_schema_20_of_20_openai(oa):
    valid = 0
    for i, prompt in enumerate(PROMPTS):
        # generous bounds: a response cut by the token limit would be unfinished JSON
        kw = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=400, seed=i,
                  response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        if i % 2:  # half of them streamed
            text = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            text = oa.chat.completions.create(**kw).choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
        valid += 1
    assert valid == 20


def test_json_schema_20_of_20_ollama(ol):
    for i, prompt in enumerate(PROMPTS):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], format=PERSON,
                  options={"num_predict": 400, "seed": i, "temperature": 0.7})
        if i % 2:
            text = "".join(c.message.content for c in ol.chat(stream=True, **kw))
        else:
            text = ol.chat(**kw).message.content
        jsonschema.validate(json.loads(text), PERSON)


def test_format_json_gives_an_object(ol):
    r = ol.generate(model=MODEL, prompt="List three colours as JSON.", format="json",
                    options={"num_predict": 400, "temperature": 0})
    assert r.done_reason == "stop" and isinstance(json.loads(r.response), dict)


def test_required_tool_choice_20_of_20_openai(oa):
    for i in range(20):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": f"What's the weather in city {i}?"}],
                  tools=[WEATHER], tool_choice="required", max_tokens=80, seed=i)
        if i % 2:
            calls: dict[int, dict] = {}
            finish = None
            for c in oa.chat.completions.create(stream=True, **kw):
                if not c.choices:
                    continue
                for d in c.choices[0].delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
                finish = c.choices[0].finish_reason or finish
            assert finish == "tool_calls" and calls[0]["id"]
            call = calls[0]
        else:
            msg = oa.chat.completions.create(**kw).choices[0]
            assert msg.finish_reason == "tool_calls"
            call = {"name": msg.message.tool_calls[0].function.name,
                    "arguments": msg.message.tool_calls[0].function.arguments}
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_required_tool_choice_20_of_20_ollama(server):
    # ollama-python has no tool_choice parameter: kiln takes it as an extension field,
    # so this one goes through httpx with the same body ollama-python builds.
    for i in range(20):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Weather in town {i}?"}],
                "tools": [WEATHER], "tool_choice": "required", "stream": bool(i % 2),
                "options": {"num_predict": 80, "seed": i}}
        r = httpx.post(server.url + "/api/chat", json=body, timeout=120)
        lines = [json.loads(x) for x in r.text.splitlines()]
        calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
        assert calls and calls[0]["function"]["name"] == "get_weather"
        jsonschema.validate(calls[0]["function"]["arguments"], WEATHER["function"]["parameters"])


def test_loop_guard_stops_the_kiln_haiku(ol, server):
    r = httpx.post(server.url + "/api/generate", timeout=120, json={
        "model": MODEL, "prompt": "Write a haiku about a kiln.", "stream": False, "options": {"temperature": 0}})
    body = r.json()
    assert body["done_reason"] == "length", body  # cut, in Ollama's words; the reason in the headers
    assert r.headers["x-kiln-finish-reason"] == "loop" and "loop guard" in r.headers["x-kiln-finish-detail"]
    # Stopped early: unguarded, it rambles on. The greedy text is each engine's own (OpenVINO
    # reads the GGUF's weights its own way): llama.cpp's is cut before 60 tokens, OpenVINO's
    # on the CPU ("The fire of a kilim burns, a fire that burns forever." again and again)
    # at 104.
    assert body["eval_count"] < (60 if BACKEND == "llamacpp" else 120)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'kiln_guardrail_stops_total{model="smollm2:135m",reason="loop"}' in metrics


# Greedy SmolLM2 on this prompt writes "1. A party with a birthday cake and a birthday party
# theme." and then the same item renumbered, to the limit: the loop of kiln's story, which
# the guard let run to the token limit before issue 12 (tests/data/guard_corpus.jsonl,
# loop-list-04; "30 facts about cats" loops too, from item 8, but costs 4 times the tokens).
LOOPING_LIST = [{"role": "user", "content": "Give me 30 ideas for a birthday party, one per line."}]


def test_loop_guard_cuts_a_renumbered_list_ollama(server):
    r = httpx.post(server.url + "/api/chat", timeout=900, json={  # a loaded machine decodes at ~1 token/s
        "model": MODEL, "messages": LOOPING_LIST, "stream": False, "options": {"temperature": 0, "num_predict": 400}})
    body = r.json()
    assert body["done_reason"] == "length" and r.headers["x-kiln-finish-reason"] == "loop", body
    assert "times in a row" in r.headers["x-kiln-finish-detail"]
    assert body["eval_count"] < 100, body  # cut at the 4th item; unguarded it runs on to the limit
    # streamed (ollama-python): the same cut, in Ollama's words
    last = list(ollama.Client(host=server.url).chat(model=MODEL, messages=LOOPING_LIST, stream=True,
                                                    options={"temperature": 0, "num_predict": 400}))[-1]
    assert last.done_reason == "length" and last.eval_count == body["eval_count"]


def test_loop_guard_cuts_a_renumbered_list_openai(oa):
    kw = dict(model=MODEL, messages=LOOPING_LIST, temperature=0, max_tokens=400)
    raw = oa.chat.completions.with_raw_response.create(**kw)
    reply = raw.parse()
    assert reply.choices[0].finish_reason == "length" and raw.headers["x-kiln-finish-reason"] == "loop"
    assert reply.usage.completion_tokens < 100
    chunks = [c for c in oa.chat.completions.create(stream=True, **kw) if c.choices]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content


# (Greedy SmolLM2 really does loop on "What is the capital of France?": "la femme au
# roi, la femme au roi, ..."; the guard is right to stop that one.)
@pytest.mark.parametrize("prompt", ["Name three primary colours.", "Explain in two sentences how bread rises.",
                                    "Write a Python function that adds two numbers."])
def test_loop_guard_leaves_ordinary_answers_alone(ol, prompt):
    r = ol.chat(model=MODEL, messages=[{"role": "user", "content": prompt}],
                options={"temperature": 0, "num_predict": 60})
    assert r.done_reason in ("stop", "length")


def agent_prompt(n_tokens: int) -> list[dict]:
    tool_docs = "\n".join(f"Tool {i}: fetch_record_{i}(id: str) returns the record number {i} from the archive."
                          for i in range(n_tokens // 20))
    return [{"role": "system", "content": "You are an agent with these tools:\n" + tool_docs},
            {"role": "user", "content": "Which tool fetches record 7?"}]


def test_10k_token_prompt_refused_naming_num_ctx(ol):
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat(model=MODEL, messages=agent_prompt(10_000), options={"num_predict": 20})
    assert e.value.status_code == 400 and "num_ctx" in e.value.error


def test_long_agent_prompt_answered_within_a_large_enough_context(ol):
    r = ol.chat(model=MODEL, messages=agent_prompt(4_000), options={"num_predict": 8, "num_ctx": 8192})
    assert r.done and r.prompt_eval_count > 5000  # all of it counted, nothing cut


def test_langchain_chat_ollama_tool_round_trip(server, ol):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama

    # A model whose policy makes it call a tool on a new question and answer once the
    # result is in (kiln's create takes a policy; ChatOllama cannot send tool_choice).
    r = httpx.post(server.url + "/api/create", json={
        "model": "smollm2-agent", "from": MODEL, "stream": False, "parameters": {"temperature": 0, "num_predict": 80},
        "policy": {"tool_choice": "required-then-auto"}})
    assert r.json() == {"status": "success"}

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"It is 21 degrees and sunny in {city}."

    llm = ChatOllama(model="smollm2-agent", base_url=server.url, validate_model_on_init=True).bind_tools([get_weather])
    messages = [HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(messages)
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    messages += [first, ToolMessage(get_weather.invoke(first.tool_calls[0]["args"]),
                                    tool_call_id=first.tool_calls[0]["id"])]
    final = llm.invoke(messages)
    assert not final.tool_calls and final.content.strip()


def test_langchain_chat_openai_tool_round_trip(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"It is 21 degrees and sunny in {city}."

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", max_tokens=80,
                     temperature=0, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris?")]
    first = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    messages += [first, ToolMessage(get_weather.invoke(first.tool_calls[0]["args"]),
                                    tool_call_id=first.tool_calls[0]["id"])]
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert final.content.strip()
