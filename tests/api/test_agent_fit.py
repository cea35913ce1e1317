"""Guardrails and tool calls through both dialects, on the fake engine (wire shapes;
the real-model tests in tests/real/test_guardrails.py check the behaviour)."""

import json

import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_policy_clamps_and_says_so(make_client, fake_engine):
    c = make_client(policy={"limits": {"temperature": {"max": 1.0}, "num_predict": {"default": 7, "max": 50}}})
    r = c.post("/api/chat", json={"model": "smollm2:135m", "stream": False, "options": {"temperature": 3},
                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert "temperature 3.0 -> 1.0 (policy max)" in r.headers["x-kiln-adjusted"]
    assert "num_predict=7 (model default)" in r.headers["x-kiln-adjusted"]
    s = fake_engine.requests[-1].sampling
    assert s.temperature == 1.0 and s.max_tokens == 7


def test_policy_refuses(make_client):
    c = make_client(policy={"mode": "refuse", "limits": {"temperature": {"max": 1.0}}})
    r = c.post("/v1/chat/completions", json={"model": "smollm2:135m", "temperature": 1.5,
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert "policy allows -inf..1" in r.json()["error"]["message"]


def test_loop_guard_stops_with_its_reason(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue("a place where the sky, a place where the sea, a place where the land, a place where the "
                        "air, a place where it ends")
    r = c.post("/api/generate", json={"model": "smollm2:135m", "prompt": "haiku", "stream": False})
    body = r.json()
    # Ollama has no "loop": the cut answer says "length"; kiln's reason is in the headers
    assert body["done_reason"] == "length" and r.headers["x-kiln-finish-reason"] == "loop"
    assert "a place where" in r.headers["x-kiln-finish-detail"]
    assert body["response"].count("a place where") in (4, 5) and "it ends" not in body["response"]
    metrics = c.get("/metrics").text
    assert 'kiln_guardrail_stops_total{model="smollm2:135m",reason="loop"} 1.0' in metrics


def test_loop_guard_streaming_done_reason(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue("go go go go go go go go go go go go go go go go go go go go")
    lines = [json.loads(x) for x in c.post("/api/chat", json={
        "model": "smollm2:135m", "messages": [{"role": "user", "content": "x"}]}).text.splitlines()]
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "length"


@pytest.mark.parametrize("tail, kept", [
    ("end", "end"),  # the generation ends between two runs of the guard: its end is checked
    (" ".join(f"w{i}" for i in range(20)), "w2"),  # the guard runs every 8 pieces: cut within 7
])
def test_loop_guard_checks_in_runs_of_pieces(make_client, fake_engine, tail, kept):
    from server.inference import GUARD_EVERY

    c = make_client()
    # tokens 1-5 are x1..x5, 6-21 "7": the 21st token makes 16 in a row (the run check;
    # a number, so the repeated-phrase check, which counts words, stays out of it)
    fake_engine.enqueue("x1 x2 x3 x4 x5 " + "7 " * 16 + tail)
    r = c.post("/api/generate", json={"model": "smollm2:135m", "prompt": "x", "stream": False})
    body = r.json()
    assert body["done_reason"] == "length" and r.headers["x-kiln-finish-reason"] == "loop", body
    words = body["response"].split()
    assert 21 <= len(words) < 21 + GUARD_EVERY and words[-1] == kept, words
    assert body["eval_count"] == len(words)


RENUMBERED = "".join(f"{i}. The cat sat on the mat.\n" for i in range(1, 40))  # the story's loop


def test_loop_guard_cuts_a_renumbered_list_ollama(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue(RENUMBERED)
    r = c.post("/api/chat", json={"model": "smollm2:135m", "stream": False,
                                  "messages": [{"role": "user", "content": "list"}]})
    body = r.json()
    assert body["done_reason"] == "length" and r.headers["x-kiln-finish-reason"] == "loop", body
    assert "'the cat sat on the mat' 4 times in a row" in r.headers["x-kiln-finish-detail"]
    # cut at the 4th item: the guard runs every 8 pieces, so the 5th may have begun
    assert body["message"]["content"].startswith(RENUMBERED[:100]) and "\n6." not in body["message"]["content"]


def test_loop_guard_cuts_a_renumbered_list_openai(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue(RENUMBERED, RENUMBERED)
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "list"}]}
    r = c.post("/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["finish_reason"] == "length" and r.headers["x-kiln-finish-reason"] == "loop"
    assert r.json()["choices"][0]["message"]["content"].count("The cat sat") in (4, 5)
    # streamed, the headers are gone before the loop: the last event says "length"
    r = c.post("/v1/chat/completions", json={**body, "stream": True})
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text.count("The cat sat") in (4, 5)
    assert 'kiln_guardrail_stops_total{model="smollm2:135m",reason="loop"} 2.0' in c.get("/metrics").text


def test_loop_guard_can_be_disabled(make_client, fake_engine):
    c = make_client(policy={"loop_guard": {"enabled": False}})
    fake_engine.enqueue("go " * 30)
    r = c.post("/api/generate", json={"model": "smollm2:135m", "prompt": "x", "stream": False})
    assert r.json()["done_reason"] == "stop"


def test_tool_call_ollama(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue(CALL)
    r = c.post("/api/chat", json={"model": "smollm2:135m", "stream": False, "tools": [WEATHER],
                                  "messages": [{"role": "user", "content": "Weather in Paris?"}]})
    msg = r.json()["message"]
    assert msg["content"] == ""
    assert msg["tool_calls"][0]["function"] == {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}
    prompt = fake_engine.requests[-1].prompt
    assert "<tools>" in prompt and "get_weather" in prompt  # the template has no tools: kiln's instructions


def test_tool_call_ollama_stream(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue("Let me check. " + CALL)
    lines = [json.loads(x) for x in c.post("/api/chat", json={
        "model": "smollm2:135m", "tools": [WEATHER],
        "messages": [{"role": "user", "content": "Weather?"}]}).text.splitlines()]
    text = "".join(x["message"]["content"] for x in lines)
    assert text.strip() == "Let me check." and "<tool_call>" not in text
    calls = [x["message"]["tool_calls"] for x in lines if x["message"].get("tool_calls")]
    assert calls == [[{"id": calls[0][0]["id"], "function": {"index": 0, "name": "get_weather",
                                                             "arguments": {"city": "Paris"}}}]]
    assert lines[-1]["done"] is True


def test_tool_call_openai(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue(CALL)
    r = c.post("/v1/chat/completions", json={"model": "smollm2:135m", "tools": [WEATHER],
                                             "messages": [{"role": "user", "content": "Weather?"}]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_tool_call_openai_stream_deltas(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue(CALL + CALL.replace("Paris", "Oslo"))
    events = [json.loads(x[6:]) for x in c.post("/v1/chat/completions", json={
        "model": "smollm2:135m", "tools": [WEATHER], "stream": True,
        "messages": [{"role": "user", "content": "Weather?"}]}).text.split("\n\n") if x.startswith("data: {")]
    deltas = [d["tool_calls"][0] for e in events for d in [e["choices"][0]["delta"]] if "tool_calls" in d]
    assert [d["index"] for d in deltas] == [0, 1] and all(d["id"] for d in deltas)
    assert [json.loads(d["function"]["arguments"])["city"] for d in deltas] == ["Paris", "Oslo"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_required_tool_choice_sends_the_call_schema(make_client, fake_engine):
    c = make_client()
    fake_engine.enqueue('{"name": "get_weather", "arguments": {"city": "Rome"}}')
    r = c.post("/v1/chat/completions", json={"model": "smollm2:135m", "tools": [WEATHER], "tool_choice": "required",
                                             "messages": [{"role": "user", "content": "Hi"}]})
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    schema = fake_engine.requests[-1].json_schema
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]


@pytest.mark.parametrize("choice, status", [({"type": "function", "function": {"name": "nope"}}, 400), ("none", 200)])
def test_tool_choice_checked(make_client, choice, status):
    c = make_client()
    r = c.post("/v1/chat/completions", json={"model": "smollm2:135m", "tools": [WEATHER], "tool_choice": choice,
                                             "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == status


def test_tool_results_round_trip_in_history(make_client, fake_engine):
    c = make_client()
    c.post("/api/chat", json={"model": "smollm2:135m", "stream": False, "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22C and sunny", "tool_name": "get_weather"}]})
    prompt = fake_engine.requests[-1].prompt
    assert '"arguments": {"city": "Paris"}' in prompt and "<tool_response>\n22C and sunny" in prompt


def test_think_refused_on_a_model_without_thinking(fake_client):
    r = fake_client.post("/api/chat", json={"model": "smollm2:135m", "think": True,
                                            "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "does not support thinking" in r.json()["error"]


def test_truncate_policy_drops_oldest_turns(make_client, fake_engine):
    c = make_client(policy={"context_overflow": "truncate"}, context_length=60)
    history = []
    for i in range(10):
        history += [{"role": "user", "content": f"question {i} " + "word " * 10},
                    {"role": "assistant", "content": f"answer {i}"}]
    r = c.post("/api/chat", json={"model": "smollm2:135m", "stream": False, "messages": [
        {"role": "system", "content": "sys"}, *history, {"role": "user", "content": "last one"}]})
    assert r.status_code == 200, r.text
    assert "oldest message(s) to fit num_ctx=60" in r.headers["x-kiln-adjusted"]
    prompt = fake_engine.requests[-1].prompt
    assert "sys" in prompt and "last one" in prompt and "question 0" not in prompt


def test_context_overflow_refused_by_default(make_client):
    c = make_client(context_length=20)
    r = c.post("/api/generate", json={"model": "smollm2:135m", "prompt": "word " * 50, "stream": True})
    assert r.status_code == 400 and "num_ctx" in r.json()["error"]


THINKING_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking %}<think>{% endif %}{% endif %}")


def test_thinking_split_on_a_thinking_model(make_client, fake_engine):
    c = make_client()
    r = c.post("/api/create", json={"model": "thinker", "from": "smollm2:135m", "template": THINKING_TEMPLATE,
                                    "stream": False})
    assert r.json() == {"status": "success"}
    assert "thinking" in c.post("/api/show", json={"model": "thinker"}).json()["capabilities"]
    fake_engine.enqueue("two plus two is four </think> The answer is 4.")
    r = c.post("/api/chat", json={"model": "thinker", "think": True, "stream": False,
                                  "messages": [{"role": "user", "content": "2+2?"}]}).json()
    assert r["message"]["thinking"].strip() == "two plus two is four"
    assert r["message"]["content"].strip() == "The answer is 4."
    fake_engine.enqueue("<think> hmm </think> Four.")
    events = [json.loads(x[6:]) for x in c.post("/v1/chat/completions", json={
        "model": "thinker", "reasoning_effort": "high", "stream": True,
        "messages": [{"role": "user", "content": "2+2?"}]}).text.split("\n\n") if x.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == "hmm"
    assert "".join(d.get("content", "") for d in deltas).strip() == "Four."
