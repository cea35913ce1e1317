"""A prompt past an NPU model's compiled MAX_PROMPT_LEN is refused as an over-long prompt,
in each client's own words, with the command that recompiles the model for it (fake
engine reporting the limits the OpenVINO engine reports; the real one is in
tests/backends/test_openvino.py)."""

NPU_INFO = {"info": {"max_prompt_len": 64, "min_response_len": 16, "num_ctx": 80, "num_parallel": 1}}
LONG = " ".join(f"w{i}" for i in range(100))  # the fake engine counts a token per word


def test_ollama_chat_refusal_names_the_limit_and_the_recompile(make_client):
    c = make_client(engine=NPU_INFO)
    r = c.post("/api/chat", json={"model": "smollm2:135m", "stream": False,
                                  "messages": [{"role": "user", "content": LONG}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err.startswith("the input length exceeds the context length: ")  # Ollama's words
    assert "context window 64 tokens (MAX_PROMPT_LEN, compiled for the NPU)" in err
    assert "kiln compile" in err and "--name smollm2:135m --profile npu --max-prompt-len 128" in err


def test_openai_refusal_is_context_length_exceeded(make_client):
    c = make_client(engine=NPU_INFO)
    r = c.post("/v1/chat/completions", json={"model": "smollm2:135m",
                                             "messages": [{"role": "user", "content": LONG}]})
    assert r.status_code == 400
    e = r.json()["error"]
    assert e["code"] == "context_length_exceeded"
    assert e["message"].startswith("This model's maximum context length is 64 tokens.")
    assert "--profile npu --max-prompt-len 128" in e["message"]


def test_truncate_drops_turns_to_fit_the_compiled_limit(make_client):
    c = make_client(engine=NPU_INFO)
    old = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]
    r = c.post("/api/chat", json={"model": "smollm2:135m", "stream": False, "truncate": True,
                                  "messages": [*old, {"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert "oldest message" in r.headers.get("x-kiln-adjusted", "")


def test_a_prompt_within_the_limit_runs(make_client):
    c = make_client(engine=NPU_INFO)
    r = c.post("/api/chat", json={"model": "smollm2:135m", "stream": False,
                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


def test_the_budget_counts_the_npu_static_cache_not_the_trained_context(make_client):
    c = make_client()
    store = c.app.state.store
    m = store.get("smollm2:135m")  # trained for 8,192
    m.name, m.backend, m.devices = "npu-model:1", "openvino", ["NPU", "CPU"]
    m.extra = {"max_prompt_len": 2048, "min_response_len": 128}
    store.put(m)
    kiln = c.post("/api/show", json={"model": "npu-model:1"}).json()["kiln"]
    assert kiln["max_prompt_len"] == 2048  # the compiled limits, shown
    assert kiln["context_length"] == 2048 + 128
    assert kiln["kv_cache"]["num_ctx"] == 2048 + 128 and kiln["kv_cache"]["bytes"] > 0
