"""End to end: a real kiln node on the bundled model as the upstream of another kiln,
driven by the official clients. The node is reached both ways: ``api = "ollama"``
(kiln -> kiln, options and keep_alive survive) and ``api = "openai"``."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import ollama
import openai
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.real_model

MODEL = "smollm2:135m"
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 12}
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_kiln_node_behind_kiln(tmp_path, front) -> None:
    (tmp_path / "node").mkdir()
    node = start_server(tmp_path / "node", env={"KILN_NUM_PARALLEL": "2"})
    try:
        kiln = front([
            {"name": "node", "api": "ollama", "urls": [node.url], "models": {"smol-remote": MODEL},
             "probe_interval": 1.0},
            {"name": "node-openai", "api": "openai", "urls": [node.url + "/v1"], "models": {"smol-openai": MODEL},
             "probe_interval": 1.0},
        ])
        direct = ollama.Client(host=node.url).chat(model=MODEL, messages=MESSAGES, options=GREEDY)
        front_client = ollama.Client(host=kiln.url)
        # the same greedy answer through either kind of upstream, in either dialect
        via_ollama = front_client.chat(model="smol-remote", messages=MESSAGES, options=GREEDY)
        via_openai = front_client.chat(model="smol-openai", messages=MESSAGES, options=GREEDY)
        assert via_ollama.message.content == direct.message.content == via_openai.message.content
        assert via_ollama.eval_count == direct.eval_count == via_openai.eval_count  # U15: usage passed on
        oa = openai.OpenAI(base_url=kiln.url + "/v1", api_key="unused")
        streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
            model="smol-remote", messages=MESSAGES, temperature=0, seed=1, max_tokens=12, stream=True)
            if c.choices)
        assert streamed == direct.message.content
        assert [m.id for m in oa.models.list() if m.id.startswith("smol-")] == ["smol-remote", "smol-openai"]

        # U15: over a kiln/Ollama upstream, options.num_ctx and keep_alive reach the node: a context
        # too small for the prompt is the node's 400, passed on; keep_alive sets the node's expiry
        with pytest.raises(ollama.ResponseError) as e:
            front_client.chat(model="smol-remote", messages=MESSAGES, options={**GREEDY, "num_ctx": 8})
        assert e.value.status_code == 400 and "num_ctx" in str(e.value)
        front_client.generate(model="smol-remote", prompt="Hi", options={"num_predict": 1}, keep_alive=0)
        wait = time.monotonic() + 5
        while httpx.get(node.url + "/api/ps").json()["models"] and time.monotonic() < wait:
            time.sleep(0.1)
        assert httpx.get(node.url + "/api/ps").json()["models"] == []  # keep_alive 0 unloaded it there

        # U4 on real nodes: SIGKILL the node mid-stream -> an error line within 1 s, never done:true
        lines: list[dict] = []
        with httpx.stream("POST", kiln.url + "/api/chat", timeout=30, json={
                "model": "smol-remote", "messages": [{"role": "user", "content": "Tell a long story."}],
                "options": {"num_predict": 2000, "temperature": 0}}) as r:
            for line in r.iter_lines():
                lines.append(json.loads(line))
                if len(lines) == 5:
                    os.killpg(node.proc.pid, signal.SIGKILL)
                    killed = time.monotonic()
        took = time.monotonic() - killed
        print(f"real node SIGKILLed mid-stream: {len(lines)} lines, error {took:.3f}s after the kill: {lines[-1]}")
        assert "error" in lines[-1] and not any(x.get("done") for x in lines) and took <= 1.0
        t0 = time.monotonic()
        r = httpx.post(kiln.url + "/api/chat", json={"model": "smol-remote", "messages": MESSAGES}, timeout=10)
        assert r.status_code == 503 and "retry-after" in r.headers and time.monotonic() - t0 < 1.5
    finally:
        stop_server(node)
