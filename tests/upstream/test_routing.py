"""Upstream routing, health and failover against fake nodes (fake_upstream.py) behind a
real ``kiln serve``. Figures are printed (``-s``) for the note; acceptance ids are
those of the research note scaleout.md §4.3."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.upstream.conftest import wait_for

FAST = {"probe_interval": 0.5, "connect_timeout": 1.0, "first_token_timeout": 1.0, "stall_timeout": 2.0}


# One client for all threads: a client per request costs more CPU (its SSL context) than
# the requests themselves on this machine.
CLIENT = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


def chat(url: str, model: str, content: str = "hi", stream: bool = False, system: str | None = None,
         timeout: float = 30) -> httpx.Response:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return CLIENT.post(url + "/v1/chat/completions", json={"model": model, "messages": msgs, "stream": stream},
                       timeout=timeout)


def timed_chats(url: str, model: str, n: int) -> tuple[list[httpx.Response], list[float]]:
    """``n`` non-streamed chats at once: the replies and each one's latency."""
    lat: list[float] = []

    def one(i: int) -> httpx.Response:
        t0 = time.monotonic()
        r = chat(url, model, f"n{i}")
        lat.append(time.monotonic() - t0)
        return r

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n))), lat


def sse_outcome(url: str, model: str, kill_at: list[float], started: list[float] | None = None) -> dict[str, Any]:
    """One streamed chat: 'complete' (finish_reason then [DONE]), or 'error' and when.
    ``started`` gets one entry when the stream's first event arrives."""
    events: list[Any] = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "go"}], "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                if started is not None and len(events) == 1:
                    started.append(time.monotonic())
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    finished = [e for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))
    if errors:
        assert not finished, "an interrupted stream must not also say it finished"
        return {"outcome": "error", "after_kill": time.monotonic() - kill_at[0], "tokens": text.count("t")}
    assert finished and finished[0]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"
    return {"outcome": "complete", "tokens": text.count("t")}


def test_burst_balance_and_model_aware_routing(nodes, front) -> None:
    """U2: 16 simultaneous requests over 2 replicas; U14: m2 only where it is served;
    one catalogue lists both models with their location."""
    # 1 s generations: the 16 are all in flight together on 2 shared cores
    a, b = nodes("--models", "m1", "--tokens", "20", "--delay", "0.05"), \
        nodes("--models", "m1,m2", "--tokens", "20", "--delay", "0.05")
    kiln = front([{"name": "fleet", "api": "openai", "urls": [a.origin + "/v1", b.origin + "/v1"], **FAST}])
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: chat(kiln.url, "m1", f"question {i}"), range(16)))
        replies += list(pool.map(lambda i: chat(kiln.url, "m2", f"question {i}"), range(6)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    assert all(r.json()["choices"][0]["message"]["content"].count("t") == 20 for r in replies)
    na, nb = a.stats()["by_model"], b.stats()["by_model"]
    ratio = max(na["m1"], nb["m1"]) / min(na["m1"], nb["m1"])
    print(f"U2 burst of 16: {na['m1']}/{nb['m1']} (max/min {ratio:.2f}); U14 m2 on A: {na.get('m2', 0)}, on B: {nb['m2']}")
    assert ratio <= 1.25
    assert "m2" not in na and nb["m2"] == 6
    tags = {m["name"]: m for m in httpx.get(kiln.url + "/api/tags").json()["models"]}
    assert tags["m1"]["kiln"]["replicas"] == [a.origin + "/v1", b.origin + "/v1"]
    assert tags["m2"]["kiln"]["replicas"] == [b.origin + "/v1"] and tags["m2"]["kiln"]["location"] == "upstream"
    assert tags["smollm2:135m"]["kiln"]["location"] == "local"
    ids = {m["id"] for m in httpx.get(kiln.url + "/v1/models").json()["data"]}
    assert {"m1", "m2", "smollm2:135m"} <= ids
    ps = {m["name"]: m["kiln"]["loaded_on"] for m in httpx.get(kiln.url + "/api/ps").json()["models"]}
    assert ps["m2"] == [b.origin + "/v1"]
    health = httpx.get(kiln.url + "/health").json()["upstreams"]["fleet"]
    assert health["up"] == 2 and [r["requests"] for r in health["replicas"]] == [na["m1"], nb["m1"] + 6]


def test_kill_a_node_mid_load(nodes, front) -> None:
    """U4 (streams on the dead node end with an error within 1 s, the others complete),
    U6 (new requests after the kill all succeed), U5 (non-streamed requests re-sent,
    all succeed), U9 (recovery after restart), U10 (all down: 503 + Retry-After fast)."""
    a = nodes("--models", "m1", "--tokens", "40", "--delay", "0.05")
    b = nodes("--models", "m1", "--tokens", "40", "--delay", "0.05")
    kiln = front([{"name": "fleet", "api": "openai", "urls": [a.origin + "/v1", b.origin + "/v1"], **FAST}])
    kill_at = [0.0]

    def killer(node: Any, after: float, box: dict[str, Any]) -> None:
        time.sleep(after)
        box["inflight"] = node.stats()["inflight"]
        kill_at[0] = time.monotonic()
        node.kill()

    # U4: 8 streams, node A SIGKILLed after 1 s of 2 s generations
    box: dict[str, Any] = {}
    t = threading.Thread(target=killer, args=(a, 1.0, box))
    t.start()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: sse_outcome(kiln.url, "m1", kill_at), range(8)))
    t.join()
    errors = [o for o in outcomes if o["outcome"] == "error"]
    worst = max(o["after_kill"] for o in errors) if errors else 0
    sent_a = httpx.get(kiln.url + "/health").json()["upstreams"]["fleet"]["replicas"][0]["requests"]
    print(f"U4 streams: {len(errors)} errors (dead node had {box['inflight']} in flight, was sent {sent_a}), "
          f"{8 - len(errors)} complete, error at most {worst:.3f}s after the kill")
    # only streams on the dead node fail (one sent there after the kill is re-sent: it had nothing yet)
    assert 1 <= box["inflight"] <= len(errors) <= sent_a
    assert all(o["tokens"] == 40 for o in outcomes if o["outcome"] == "complete")
    assert worst <= 1.0

    # U6: 16 new requests at once right after: none fails; the dead replica is out
    with ThreadPoolExecutor(16) as pool:
        after = list(pool.map(lambda i: chat(kiln.url, "m1", f"q{i}"), range(16)))
    assert all(r.status_code == 200 for r in after), [r.text for r in after if r.status_code != 200]
    fleet = httpx.get(kiln.url + "/health").json()["upstreams"]["fleet"]
    assert [r["up"] for r in fleet["replicas"]] == [False, True]

    # U9: restart A; back in rotation within probe interval x ok_threshold (+ slack)
    a.start()
    t0 = time.monotonic()
    back = wait_for(lambda: httpx.get(kiln.url + "/health").json()["upstreams"]["fleet"]["up"] == 2, 5.0) 
    print(f"U9 recovery: A up again {back:.2f}s after restart (probe 0.5 s x 2)")
    assert time.monotonic() - t0 <= 0.5 * 2 + 1.0

    # U5: 8 non-streamed requests, A killed again after 1 s: all 8 succeed, re-sent to B
    box = {}
    t = threading.Thread(target=killer, args=(a, 1.0, box))
    t0 = time.monotonic()
    t.start()
    whole, lat = timed_chats(kiln.url, "m1", 8)
    t.join()
    assert all(r.status_code == 200 for r in whole), [r.text for r in whole if r.status_code != 200]
    assert all(r.json()["choices"][0]["message"]["content"].count("t") == 40 for r in whole)
    print(f"U5 non-streamed: 8/8 ok ({box['inflight']} re-sent), max latency {max(lat):.2f}s vs 2.0s alone")
    assert box["inflight"] >= 1 and max(lat) <= 2.0 + 1.0 + 2.0 + 1.0  # one full generation added, plus slack

    # U10: both down -> 503 + Retry-After, fast, in each dialect (before and after ejection)
    b.kill()
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/api/generate", {"prompt": "x", "stream": False})):
        t0 = time.monotonic()
        r = httpx.post(kiln.url + path, json={"model": "m1", **body}, timeout=10)
        took = time.monotonic() - t0
        print(f"U10 {path}: {r.status_code} Retry-After={r.headers.get('retry-after')} in {took:.3f}s")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and took < 1.5
        err = r.json()["error"]
        assert isinstance(err, dict if path.startswith("/v1") else str)


def test_frozen_and_loading_replicas(nodes, front, tmp_path) -> None:
    """U8: a SIGSTOPped node (accepts, never answers): the first-token timeout re-sends
    the request, the node is ejected. U11: a replica whose /health is 503 gets nothing
    until it reports 200."""
    loading = tmp_path / "loading"
    loading.write_text("")
    a = nodes("--models", "m1", "--tokens", "5", "--delay", "0.01")
    b = nodes("--models", "m1", "--tokens", "5", "--delay", "0.01", "--loading", str(loading))
    kiln = front([{"name": "fleet", "api": "openai", "urls": [a.origin + "/v1", b.origin + "/v1"], **FAST}])
    for i in range(6):
        assert chat(kiln.url, "m1", f"q{i}").status_code == 200
    assert b.stats()["requests"] == 0 and a.stats()["requests"] == 6
    loading.unlink()
    wait_for(lambda: httpx.get(kiln.url + "/health").json()["upstreams"]["fleet"]["up"] == 2, 5.0)

    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: chat(kiln.url, "m1", f"s{i}", stream=i % 2 == 0), range(4)))
        took = time.monotonic() - t0
        assert all(r.status_code == 200 for r in replies)
        assert all(r.text.count("t") >= 5 for r in replies)
        fleet = httpx.get(kiln.url + "/health").json()["upstreams"]["fleet"]
        print(f"U8 SIGSTOP: 4/4 ok in {took:.2f}s (first-token timeout 1 s); replica A up={fleet['replicas'][0]['up']}")
        assert fleet["replicas"][0]["up"] is False and took < 1.0 + 2.0
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)


def test_disconnects_close_the_upstream_request(nodes, front) -> None:
    """U12: 200 clients that go away mid-stream each close the upstream request at once;
    nothing stays in flight and the gateway's memory does not grow with them."""
    a = nodes("--models", "m1", "--tokens", "200", "--delay", "0.02")
    kiln = front([{"name": "fleet", "api": "openai", "urls": [a.origin + "/v1"], **FAST}])
    n, warm = 200, 20
    worst, rss = 0.0, 0
    for i in range(n):
        if i == warm:  # after the first connections, imports and pools are in place
            rss = kiln.rss_bytes()
        with CLIENT.stream("POST", kiln.url + "/api/chat", timeout=10,
                          json={"model": "m1", "messages": [{"role": "user", "content": "x"}]}) as r:
            for k, _ in enumerate(r.iter_lines()):
                if k == 2:
                    break
        t0 = time.monotonic()
        wait_for(lambda: a.stats()["cancelled"] == i + 1, 1.0, step=0.01)
        worst = max(worst, time.monotonic() - t0)
    s = a.stats()
    after = kiln.rss_bytes()
    print(f"U12: {n} disconnects, upstream request closed at most {worst:.3f}s after; in flight now "
          f"{s['inflight']}; gateway RSS {rss / 2**20:.1f} MiB after {warm}, {after / 2**20:.1f} MiB after {n}")
    assert s["inflight"] == 0 and s["completed"] == 0
    assert abs(after - rss) <= rss * 0.10
    assert httpx.get(kiln.url + "/health").json()["upstreams"]["fleet"]["replicas"][0]["inflight"] == 0


def test_prefix_affinity(nodes, front) -> None:
    """U13 (routing half): a session's second turn lands where its first did; unrelated
    sessions spread (max/min <= 1.5 over 64)."""
    a = nodes("--models", "m1", "--tokens", "2", "--delay", "0.0")
    b = nodes("--models", "m1", "--tokens", "2", "--delay", "0.0")
    kiln = front([{"name": "fleet", "api": "openai", "urls": [a.origin + "/v1", b.origin + "/v1"], **FAST}])
    with httpx.Client(base_url=kiln.url) as client:
        for i in range(64):
            system = f"You are agent {i}. " + "Rules. " * 50
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"task {i}"}]
            assert client.post("/v1/chat/completions", json={"model": "m1", "messages": msgs}).status_code == 200
            msgs += [{"role": "assistant", "content": "t0 t1"}, {"role": "user", "content": "and then?"}]
            assert client.post("/v1/chat/completions", json={"model": "m1", "messages": msgs}).status_code == 200
    sa, sb = a.stats()["systems"], b.stats()["systems"]
    split = sum(1 for s in set(sa) if s in sb)
    ratio = max(len(sa), len(sb)) / max(1, min(len(sa), len(sb)))
    print(f"U13 affinity: 64 sessions x 2 turns: {len(sa)}/{len(sb)} (max/min {ratio:.2f}), sessions split: {split}")
    assert split == 0 and ratio <= 1.5


def test_throughput_scales_with_replicas(nodes, front) -> None:
    """U18: nodes that generate one request at a time; 16 at once through 2 replicas
    finish in about half the time of 1 (kiln is not the bottleneck)."""
    a = nodes("--models", "m1", "--tokens", "4", "--delay", "0.1", "--serial")
    b = nodes("--models", "m1", "--tokens", "4", "--delay", "0.1", "--serial")
    slow = {**FAST, "first_token_timeout": 30.0}  # requests wait their turn on a serial node
    kiln = front([{"name": "one", "api": "openai", "urls": [a.origin + "/v1"], "models": {"solo": "m1"}, **slow},
                  {"name": "two", "api": "openai", "urls": [a.origin + "/v1", b.origin + "/v1"],
                   "models": {"duo": "m1"}, **slow}])
    walls = {}
    for model in ("solo", "duo"):
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda i: chat(kiln.url, model, f"q{i}", stream=True), range(16)))
        assert all(r.status_code == 200 and r.text.count("t") >= 4 for r in replies)
        walls.setdefault(model, []).append(time.monotonic() - t0)
    scale = min(walls["solo"]) / min(walls["duo"])
    print(f"U18: 16 requests on serial nodes: 1 replica {min(walls['solo']):.2f}s, 2 replicas "
          f"{min(walls['duo']):.2f}s: x{scale:.2f} (ideal: 6.4 s, 3.2 s)")
    assert scale >= 1.9


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_dialects_over_either_kind_of_upstream(nodes, front) -> None:
    """U15: Ollama's dialect over an OpenAI upstream and OpenAI's over an Ollama one:
    framing, usage and tool calls come out as for a local model."""
    a = nodes("--models", "m1", "--tokens", "5", "--delay", "0.0")
    kiln = front([{"name": "oa", "api": "openai", "urls": [a.origin + "/v1"], "models": {"via-openai": "m1"}},
                  {"name": "ol", "api": "ollama", "urls": [a.origin], "models": {"via-ollama": "m1"}}])
    lines = [json.loads(x) for x in CLIENT.post(kiln.url + "/api/chat", json={
        "model": "via-openai", "messages": [{"role": "user", "content": "x"}]}).text.splitlines()]
    assert [x["message"]["content"] for x in lines[:-1]] == [f"t{i} " for i in range(5)]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 5 and lines[-1]["prompt_eval_count"] == 3
    r = CLIENT.post(kiln.url + "/api/chat", json={"model": "via-openai", "stream": False, "tools": TOOLS,
                                                  "messages": [{"role": "user", "content": "weather in Oslo?"}]})
    (call,) = r.json()["message"]["tool_calls"]  # the shape kiln gives a local model's call
    assert call["function"] == {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}}
    assert a.stats()["last"]["tools"] == TOOLS
    r = CLIENT.post(kiln.url + "/v1/chat/completions", json={"model": "via-ollama", "tools": TOOLS,
                                                             "messages": [{"role": "user", "content": "weather?"}]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'} and call["type"] == "function"
    r = CLIENT.post(kiln.url + "/api/generate", json={"model": "via-ollama", "prompt": "p", "stream": False,
                                                      "options": {"num_predict": 3, "num_ctx": 2048},
                                                      "keep_alive": "7m"})
    assert r.json()["response"] == "t0 t1 t2 " and r.json()["eval_count"] == 3
    sent = a.stats()["last"]
    assert sent["options"]["num_ctx"] == 2048 and sent["keep_alive"] == 420.0 and sent["prompt"] == "p"


def test_model_management_through_upstreams(nodes, front) -> None:
    """Copy and delete go to every replica of an Ollama/kiln upstream, so they are refused
    while one is down (nothing changed), for an OpenAI upstream (no such API) and for
    models the config names. The real sends are in tests/real (KILN_CONFORMANCE_BACKEND=upstream)."""
    a, b = nodes("--models", "m1", "--tokens", "2", "--delay", "0"), nodes("--models", "m1", "--tokens", "2")
    kiln = front([{"name": "ol", "api": "ollama", "urls": [a.origin, b.origin], **FAST},
                  {"name": "oa", "api": "openai", "urls": [a.origin + "/v1"], "models": {"via-openai": "m1"}},
                  {"name": "named", "api": "ollama", "urls": [a.origin], "models": {"via-named": "m1"}}])
    for source, status in (("via-openai", 400), ("via-named", 400)):
        r = CLIENT.post(kiln.url + "/api/copy", json={"source": source, "destination": "x:1"})
        assert r.status_code == status and ("cannot be copied" in r.json()["error"] or "no API" in r.json()["error"])
        r = CLIENT.request("DELETE", kiln.url + "/api/delete", json={"model": source})
        assert r.status_code == 400
    b.kill()
    wait_for(lambda: httpx.get(kiln.url + "/health").json()["upstreams"]["ol"]["up"] == 1, 5.0)
    r = CLIENT.post(kiln.url + "/api/copy", json={"source": "m1", "destination": "x:1"})
    assert r.status_code == 503 and "nothing was changed" in r.json()["error"] and "retry-after" in r.headers
    assert a.stats()["by_path"].get("/api/copy") is None
    # load and unload of an OpenAI upstream's model: answered, not sent (it has no such API)
    r = CLIENT.post(kiln.url + "/api/generate", json={"model": "via-openai", "keep_alive": 0})
    assert r.json()["done_reason"] == "unload" and a.stats()["requests"] == 0
