"""What kiln sends an upstream, and how the upstream's events become chunks (no HTTP)."""

from __future__ import annotations

import pytest

from backends.base import FinishReason
from backends.upstream import UpstreamConfig, UpstreamPool, UpstreamUnavailable, key
from backends.upstream_wire import Decoder, UpstreamError, UpstreamRequest, build, parse_line
from server.tools import ToolStream, functions

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_openai_body_maps_ollama_options_and_format() -> None:
    req = UpstreamRequest(prompt="", messages=[{"role": "user", "content": "hi"}], format={"type": "object"},
                          options={"num_predict": 5, "temperature": 0.1, "top_k": 3, "num_ctx": 99, "stop": ["x"]})
    path, body = build("openai", "qwen", req)
    assert path == "/chat/completions"
    assert body["max_tokens"] == 5 and body["temperature"] == 0.1 and body["top_k"] == 3 and body["stop"] == ["x"]
    assert "num_ctx" not in body and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    raw = UpstreamRequest(prompt="once upon", raw=True, options={"num_predict": -1})
    path, body = build("openai", "m", raw)
    assert path == "/completions" and body["prompt"] == "once upon" and "max_tokens" not in body
    gen = UpstreamRequest(prompt="why?", system="be brief")
    assert build("openai", "m", gen)[1]["messages"] == [{"role": "system", "content": "be brief"},
                                                         {"role": "user", "content": "why?"}]


def test_ollama_body_keeps_options_keep_alive_format_think() -> None:
    req = UpstreamRequest(prompt="", messages=[{"role": "user", "content": "hi"}], format="json", think=True,
                          options={"num_ctx": 8192, "num_predict": 3}, keep_alive=-1, tools=TOOLS)
    path, body = build("ollama", "qwen3:8b", req)
    assert path == "/api/chat"
    assert body["options"] == {"num_ctx": 8192, "num_predict": 3} and body["keep_alive"] == -1
    assert body["format"] == "json" and body["think"] is True and body["tools"] == TOOLS
    path, body = build("ollama", "m", UpstreamRequest(prompt="p", raw=True))
    assert path == "/api/generate" and body["raw"] is True and body["prompt"] == "p"


def test_openai_stream_with_reasoning_and_tool_calls_reads_as_local_output() -> None:
    d = Decoder("openai")
    events = [
        {"choices": [{"delta": {"role": "assistant", "reasoning_content": "let me"}}]},
        {"choices": [{"delta": {"reasoning_content": " think"}}]},
        {"choices": [{"delta": {"content": "Sure."}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "get_weather",
                                                                                      "arguments": '{"ci'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9,
                                  "prompt_tokens_details": {"cached_tokens": 4}}},
    ]
    chunks = [c for e in events for c in d.feed(e)] + d.end()
    text = "".join(c.text for c in chunks)
    assert text.startswith("<think>let me think</think>Sure.")
    last = chunks[-1]
    assert last.finish_reason == FinishReason.STOP and last.usage.completion_tokens == 9
    assert last.usage.cached_tokens == 4
    stream = ToolStream(functions(TOOLS), forced=False)
    shown = stream.feed(text.split("</think>", 1)[1])
    held, calls = stream.finish()
    assert shown + held == "Sure." and calls[0].name == "get_weather" and calls[0].arguments == {"city": "Oslo"}


def test_ollama_stream_and_errors() -> None:
    d = Decoder("ollama")
    out = d.feed({"message": {"content": "hi"}, "done": False})
    out += d.feed({"message": {"content": ""}, "done": True, "done_reason": "length", "eval_count": 3,
                   "prompt_eval_count": 2})
    assert [c.text for c in out] == ["hi", ""] and out[-1].finish_reason == FinishReason.LENGTH
    assert out[-1].usage.completion_tokens == 3 and d.done
    with pytest.raises(UpstreamError, match="boom"):
        Decoder("ollama").feed({"error": "boom"})
    with pytest.raises(UpstreamError, match="bad"):
        Decoder("openai").feed({"error": {"message": "bad"}})
    assert parse_line("openai", ": keep-alive") is None and parse_line("openai", "data: [DONE]") == "done"
    with pytest.raises(UpstreamError):
        parse_line("ollama", "not json")


def test_selection_least_outstanding_affinity_and_saturation() -> None:
    pool = UpstreamPool([UpstreamConfig(name="u", urls=["http://a:1/v1", "http://b:1/v1", "http://c:1/v1"],
                                        models=["m"], max_inflight=2)])
    u = pool.upstreams[0]
    for r in u.replicas:
        r.up = True
    picked = []
    for _ in range(6):  # counted at selection: a burst spreads evenly
        r = pool.select(u, "m", None, set())
        r.inflight += 1
        r.routed += 1
        picked.append(r.base)
    assert sorted(picked) == sorted([r.base for r in u.replicas] * 2)
    with pytest.raises(UpstreamUnavailable) as e:
        pool.select(u, "m", None, set())
    assert e.value.retry_after == 1 and "busy" in str(e.value)
    for r in u.replicas:
        r.inflight = 0
    home = pool.select(u, "m", "session-1", set())
    assert all(pool.select(u, "m", "session-1", set()) is home for _ in range(5))
    home.inflight = 3  # > 2 and > 1.5x the least busy: affinity gives way
    assert pool.select(u, "m", "session-1", set()) is not home
    for r in u.replicas:
        r.up = False
    with pytest.raises(UpstreamUnavailable) as e:
        pool.select(u, "m", None, set())
    assert e.value.retry_after == 2 and "no replica" in str(e.value)
    assert key("Qwen3:8B") == "qwen3:8b" and key("m") == "m:latest"


def test_upstreams_from_the_config_file(monkeypatch, tmp_path) -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    cfg = tmp_path / "kiln.toml"
    cfg.write_text('[[upstreams]]\nname = "gpu"\nurls = ["http://10.0.0.5:8000/v3"]\napi_key_env = "GPU_KEY"\n'
                   'models = {"qwen3:32b" = "Qwen/Qwen3-32B"}\n'
                   '[[upstreams]]\nname = "nodes"\napi = "ollama"\nurls = ["http://192.168.1.7:11434/"]\n')
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    monkeypatch.setenv("GPU_KEY", "sekrit")
    s = Settings()
    gpu, nodes = s.upstreams
    assert gpu.api_key.get_secret_value() == "sekrit" and "sekrit" not in repr(s)
    assert nodes.api == "ollama" and nodes.urls == ["http://192.168.1.7:11434"]  # private addresses: the admin's
    pool = UpstreamPool(s.upstreams)
    assert pool.upstreams[0].replicas[0].base == "http://10.0.0.5:8000/v3"  # OVMS prefix kept
    assert pool.find("Qwen3:32B") is pool.upstreams[0] and pool.upstreams[0].model_id("qwen3:32b") == "Qwen/Qwen3-32B"
    monkeypatch.delenv("GPU_KEY")
    with pytest.raises(ValidationError, match="GPU_KEY is not set"):
        Settings()
    for bad, why in (('[[upstreams]]\nname = "a"\nurls = ["ftp://x"]\n', "not http"),
                     ('[[upstreams]]\nname = "a"\nurls = ["http://x"]\n[[upstreams]]\nname = "a"\nurls = ["http://y"]\n',
                      "unique"),
                     ('[[upstreams]]\nname = "a"\nurls = ["http://x"]\napi = "grpc"\n', "openai"),
                     ('[[upstreams]]\nname = "a"\nurls = []\n', "at least 1")):
        cfg.write_text(bad)
        with pytest.raises(ValidationError, match=why):
            Settings()
