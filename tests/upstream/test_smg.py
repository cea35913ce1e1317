"""U16 of the research note (scaleout.md §4.3): kiln with SMG, the SGLang model gateway
(PyPI ``smg``, in the test extras; it runs offline). Both directions of
deploy/fleet/compose.yaml: kiln nodes as SMG's workers, and a front kiln whose one
upstream is SMG (``api = "openai"``), on loopback."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.conftest import start_server, stop_server
from tests.upstream.conftest import wait_for
from tests.upstream.test_routing import chat, sse_outcome, timed_chats

# SMG queues and balances behind its one URL; kiln probes it as one replica
ROUTER = {"probe_interval": 0.5, "connect_timeout": 1.0, "first_token_timeout": 30.0, "stall_timeout": 5.0,
          "max_inflight": 64}


def test_a_node_killed_behind_smg(nodes, smg, front) -> None:
    """The research note's SMG reference rows (§3.4), through a front kiln: a node
    SIGKILLed mid-load ends exactly its own streams with an error, the others complete;
    non-streamed requests are re-sent by SMG and all succeed; SMG stays up for kiln."""
    a = nodes("--models", "m1", "--tokens", "40", "--delay", "0.05")
    b = nodes("--models", "m1", "--tokens", "40", "--delay", "0.05")
    router = smg([a.origin, b.origin], policy="power_of_two")
    kiln = front([{"name": "smg", "api": "openai", "urls": [router.url + "/v1"], **ROUTER}])
    assert "m1" in {m["id"] for m in httpx.get(kiln.url + "/v1/models").json()["data"]}
    kill_at, box = [0.0], {}

    def killer(after: float) -> None:
        time.sleep(after)
        box["inflight"] = a.stats()["inflight"]
        kill_at[0] = time.monotonic()
        a.kill()

    t = threading.Thread(target=killer, args=(1.0,))
    t.start()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: sse_outcome(kiln.url, "m1", kill_at), range(8)))
    t.join()
    errors = [o for o in outcomes if o["outcome"] == "error"]
    worst = max((o["after_kill"] for o in errors), default=0.0)
    print(f"U16 streams via SMG: {len(errors)} errors (the dead node had {box['inflight']} in flight), "
          f"{8 - len(errors)} complete, error at most {worst:.3f}s after the kill; "
          f"tokens before the error: {sorted(o['tokens'] for o in errors)}")
    assert len(errors) == box["inflight"] >= 1 and worst <= 1.0
    assert all(o["tokens"] == 40 for o in outcomes if o["outcome"] == "complete")
    assert httpx.get(kiln.url + "/health").json()["upstreams"]["smg"]["up"] == 1  # one dead node is not a dead router

    # A back: SMG probes it in again (every 1 s); then the non-streamed kill
    a.start()

    def a_serves() -> bool:
        chat(kiln.url, "m1", "warm")
        return a.stats()["requests"] > 0

    back = wait_for(a_serves, 15.0, step=0.2)
    t = threading.Thread(target=killer, args=(1.0,))
    t.start()
    whole, lat = timed_chats(kiln.url, "m1", 8)
    t.join()
    ok = [r for r in whole if r.status_code == 200 and r.json()["choices"][0]["message"]["content"].count("t") == 40]
    # kiln streams from SMG even for a whole answer, so SMG cannot re-send a request whose
    # node died mid-answer; kiln sends it to SMG once more, and SMG picks the live node
    print(f"U16 non-streamed via SMG: {len(ok)}/8 ok ({box['inflight']} on the killed node, re-sent through SMG), "
          f"max latency {max(lat):.2f}s vs 2.0s alone; A was back in SMG's rotation {back:.1f}s after its restart")
    assert len(ok) == 8, [r.text for r in whole if r.status_code != 200]


@pytest.mark.real_model
def test_kiln_nodes_behind_smg(tmp_path, smg, front) -> None:
    """Two real kiln nodes on the bundled model as SMG's workers (cache_aware), and a
    front kiln pointing its upstream at SMG: the same greedy answer everywhere, through
    the official clients in both dialects."""
    model = "smollm2:135m"
    started = []
    try:
        for name in ("node1", "node2"):
            (tmp_path / name).mkdir()
            started.append(start_server(tmp_path / name, env={"KILN_NUM_PARALLEL": "2"}))
        router = smg([n.url for n in started], policy="cache_aware")
        assert router.models() == [model]  # kiln's /v1/models is what SMG routes by
        kiln = front([{"name": "smg", "api": "openai", "urls": [router.url + "/v1"], **ROUTER}])
        messages = [{"role": "user", "content": "Name three colours."}]
        greedy: dict[str, Any] = {"temperature": 0, "seed": 1, "max_tokens": 8}

        def answer(base: str, stream: bool = False) -> str:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120)
            if not stream:
                return client.chat.completions.create(model=model, messages=messages, **greedy).choices[0].message.content
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **greedy)
                if c.choices)

        direct = answer(started[0].url)
        assert direct and answer(router.url) == direct  # kiln as SMG's worker
        assert answer(router.url, stream=True) == direct  # SSE through SMG
        assert answer(kiln.url) == direct and answer(kiln.url, stream=True) == direct  # front -> SMG -> node
        via_ollama = ollama.Client(host=kiln.url, timeout=120).chat(
            model=model, messages=messages, options={"temperature": 0, "seed": 1, "num_predict": 8})
        assert via_ollama.message.content == direct and via_ollama.eval_count <= 8
        oa = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", timeout=120)
        done = oa.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
        assert done.object == "text_completion" and done.choices[0].text and done.usage.completion_tokens <= 4
        tags = {m["name"]: m for m in httpx.get(kiln.url + "/api/tags").json()["models"]}
        assert tags[model]["kiln"]["upstream"] == "smg" and tags[model]["kiln"]["replicas_up"] == 1
        served = [httpx.get(n.url + "/metrics").text.count(f'model="{model}"') > 0 for n in started]
        print(f"U16 kiln nodes behind SMG: the same greedy answer direct, via SMG, via the front ({direct!r}); "
              f"nodes that served: {served}")
    finally:
        for s in started:
            stop_server(s)
