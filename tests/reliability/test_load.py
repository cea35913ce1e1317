"""Load: N requests at concurrency 16 against a real server whose queue is bounded
(4 slots, 8 waiting), half Ollama NDJSON streams, half OpenAI SSE streams.

Each answer must be one of two things: a complete, well-formed stream, or a 503 in
the dialect's error shape with ``Retry-After`` (the queue was full). Nothing else:
no other status, no in-stream error. Each prompt asks the model to repeat its own
nonce word, so an output that carries another request's nonce gives away cross-talk
between the batched sequences. A client told to retry waits ``Retry-After`` before
its next request, as a polite client does; the 503 still counts as that request's
answer.

While it runs, a scraper reads /metrics about once a second: it must see the load
(a request holding a slot or waiting) and ``kiln_requests_total`` growing, and never
more requests holding slots or waiting than the settings allow.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field

import httpx
import pytest

from reliability_support import MODEL, greedy_chat, metric_sum, parse_metrics, percentile

pytestmark = pytest.mark.real_model

NUM_PARALLEL = 4
MAX_QUEUE = 8
NUM_PREDICT = 16
CHAT_ENDPOINTS = ("/api/chat", "/v1/chat/completions")
# Ollama's values only: an answer the loop guard cut ends with "length" (its reason is
# in X-Kiln-Finish-Reason)
DONE_REASONS = ("stop", "length")
FINISH_REASONS = ("stop", "length")
BUSY = "server busy, please try again.  maximum pending requests exceeded"


def nonces(n: int, seed: int = 6) -> list[str]:
    """Distinct pronounceable nonsense words (CVCVCVC), so none is a word the model
    would produce by itself."""
    rng = random.Random(seed)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(cons if i % 2 == 0 else vows) for i in range(7)))
    return sorted(out, key=lambda _: rng.random())


@dataclass
class Outcome:
    i: int
    dialect: str  # "ollama" or "openai"
    nonce: str
    status: int = 0
    kind: str = "bad"  # "ok", "busy" or "bad"
    problem: str = ""
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    retry_after: float = 0.0


def _check_busy(o: Outcome, r: httpx.Response, body: bytes) -> None:
    ra = r.headers.get("retry-after")
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        o.problem = f"503 body is not the dialect's error shape: {body[:200]!r}"
        return
    if o.dialect == "ollama":
        shape_ok = isinstance(err, str) and err == BUSY
    else:
        shape_ok = (isinstance(err, dict) and {"message", "type", "param", "code"} <= err.keys()
                    and err["message"] == BUSY)
    if not shape_ok:
        o.problem = f"503 body is not the dialect's error shape: {body[:200]!r}"
    elif ra is None or not ra.isdigit():
        o.problem = f"503 without a Retry-After of seconds: {ra!r}"
    else:
        o.kind, o.retry_after = "busy", float(ra)


def _check_ndjson(o: Outcome, body: bytes) -> None:
    lines = body.decode("utf-8").splitlines()
    parts, final = [], None
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        obj = json.loads(line)
        if "error" in obj:
            o.problem = f"in-stream error at line {n}: {obj['error']}"
            return
        if final is not None:
            o.problem = "lines after the done line"
            return
        if obj.get("model") != MODEL:
            o.problem = f"line {n} names model {obj.get('model')!r}"
            return
        if obj.get("done") is True:
            final = obj
        else:
            if obj.get("done") is not False or not isinstance(obj["message"]["content"], str):
                o.problem = f"malformed line {n}: {line[:200]}"
                return
            parts.append(obj["message"]["content"])
    if final is None:
        o.problem = f"no done line (stream cut short after {len(lines)} lines)"
        return
    if final.get("done_reason") not in DONE_REASONS or not 0 < final.get("eval_count", 0) <= NUM_PREDICT:
        o.problem = f"bad final line: {json.dumps(final)[:300]}"
        return
    o.kind, o.text, o.tokens = "ok", "".join(parts), final["eval_count"]


def _check_sse(o: Outcome, body: bytes) -> None:
    text = body.decode("utf-8")
    events = [e for e in text.split("\n\n") if e.strip()]
    if not events or events[-1].strip() != "data: [DONE]":
        o.problem = f"SSE does not end with data: [DONE] ({len(events)} events; last {events[-1:]!r})"
        return
    parts, finish, usage, ids = [], None, None, set()
    for n, event in enumerate(events[:-1]):
        if not event.startswith("data: "):
            o.problem = f"event {n} is not a data event: {event[:200]!r}"
            return
        payload = event[len("data: "):]
        if payload.strip() == "[DONE]":
            o.problem = "[DONE] before the end"
            return
        obj = json.loads(payload)
        if "error" in obj:
            o.problem = f"in-stream error event {n}: {obj['error']}"
            return
        ids.add(obj["id"])
        if obj.get("usage"):
            usage = obj["usage"]
        for choice in obj.get("choices", []):
            parts.append(choice.get("delta", {}).get("content") or "")
            finish = choice.get("finish_reason") or finish
    if len(ids) != 1:
        o.problem = f"chunks of {len(ids)} different completion ids"
    elif finish not in FINISH_REASONS:
        o.problem = f"no finish_reason (got {finish!r})"
    elif not usage or not 0 < usage["completion_tokens"] <= NUM_PREDICT:
        o.problem = f"bad usage: {usage!r}"
    else:
        o.kind, o.text, o.tokens = "ok", "".join(parts), usage["completion_tokens"]


async def one(client: httpx.AsyncClient, o: Outcome) -> Outcome:
    messages = [{"role": "user", "content": f"Repeat the word {o.nonce} three times."}]
    if o.dialect == "ollama":
        path, body = "/api/chat", {"model": MODEL, "messages": messages, "stream": True,
                                   "options": {"temperature": 0, "num_predict": NUM_PREDICT}}
    else:
        path, body = "/v1/chat/completions", {"model": MODEL, "messages": messages, "stream": True,
                                              "temperature": 0, "max_tokens": NUM_PREDICT,
                                              "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    try:
        async with client.stream("POST", path, json=body) as r:
            data = await r.aread()
            o.status = r.status_code
            if r.status_code == 503:
                _check_busy(o, r, data)
            elif r.status_code != 200:
                o.problem = f"status {r.status_code}: {data[:300]!r}"
            elif o.dialect == "ollama":
                if not r.headers.get("content-type", "").startswith("application/x-ndjson"):
                    o.problem = f"content-type {r.headers.get('content-type')!r}"
                else:
                    _check_ndjson(o, data)
            elif not r.headers.get("content-type", "").startswith("text/event-stream"):
                o.problem = f"content-type {r.headers.get('content-type')!r}"
            else:
                _check_sse(o, data)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        o.problem = f"{type(e).__name__}: {e}"
    o.seconds = time.monotonic() - t0
    return o


@dataclass
class Scrapes:
    active: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    chat_requests: list[float] = field(default_factory=list)
    generated: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def scrape(url: str, stop: asyncio.Event, out: Scrapes, deadline: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                m = parse_metrics((await c.get("/metrics")).text)
                out.active.append(metric_sum(m, "kiln_active_requests"))
                out.queue.append(metric_sum(m, "kiln_queue_depth"))
                out.chat_requests.append(metric_sum(m, "kiln_requests_total", endpoint=CHAT_ENDPOINTS))
                out.generated.append(metric_sum(m, "kiln_generated_tokens_total"))
            except httpx.HTTPError as e:
                out.errors.append(f"{type(e).__name__}: {e}")
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def run_load(url: str, n: int, concurrency: int, deadline_s: float) -> tuple[list[Outcome], Scrapes, float]:
    words = nonces(n)
    todo = [Outcome(i, "ollama" if i % 2 == 0 else "openai", words[i]) for i in range(n)]
    done: list[Outcome] = []
    next_i = 0
    deadline = time.monotonic() + deadline_s
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(30.0, read=300.0)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < n and time.monotonic() < deadline:
            o = todo[next_i]
            next_i += 1
            done.append(await one(client, o))
            if o.kind == "busy":  # a polite client waits as told before its next request
                await asyncio.sleep(min(o.retry_after, 5.0))

    stop = asyncio.Event()
    scrapes = Scrapes()
    t0 = time.monotonic()
    scraper = asyncio.create_task(scrape(url, stop, scrapes, deadline + 60))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.monotonic() - t0
    stop.set()
    await scraper
    return done, scrapes, wall


def foreign_nonces(outcomes: list[Outcome]) -> list[tuple[int, str]]:
    """(request, nonce) pairs where a completed output carries another request's
    nonce, even glued to other letters."""
    words = {o.nonce for o in outcomes}
    found = []
    for o in outcomes:
        if o.kind == "ok":
            rest = o.text.lower().replace(o.nonce, " ")
            found += [(o.i, w) for w in words - {o.nonce} if w in rest]
    return found


def test_load_bounded_queue(real_server, sizes, report):
    s = real_server(env={"KILN_NUM_PARALLEL": str(NUM_PARALLEL), "KILN_MAX_QUEUE": str(MAX_QUEUE)})
    assert greedy_chat(s.url).status_code == 200  # warm-up: the load is not in the figures

    done, scrapes, wall = asyncio.run(run_load(s.url, sizes.load_requests, sizes.concurrency,
                                               sizes.load_deadline))

    ok = [o for o in done if o.kind == "ok"]
    busy = [o for o in done if o.kind == "busy"]
    bad = [o for o in done if o.kind == "bad"]
    latencies = [o.seconds for o in ok]
    tokens = sum(o.tokens for o in ok)
    crosstalk = foreign_nonces(done)
    echoed = sum(1 for o in ok if o.nonce in o.text.lower())
    log = s.log.read_text(errors="replace")
    server_5xx = re.findall(r"status=5(?!03)\d\d", log)
    figures = dict(
        requests=len(done), asked=sizes.load_requests, concurrency=sizes.concurrency,
        num_parallel=NUM_PARALLEL, max_queue=MAX_QUEUE, num_predict=NUM_PREDICT,
        completed=len(ok), completed_ollama=sum(o.dialect == "ollama" for o in ok),
        completed_openai=sum(o.dialect == "openai" for o in ok), busy_503=len(busy), errors=len(bad),
        crosstalk=len(crosstalk), own_nonce_echoed=echoed, wall_s=round(wall, 1), generated_tokens=tokens,
        tokens_per_s=round(tokens / wall, 1) if wall else None,
        latency_p50_s=round(percentile(latencies, 50) or 0, 2), latency_p95_s=round(percentile(latencies, 95) or 0, 2),
        latency_max_s=round(max(latencies, default=0), 2),
        metrics_scrapes=len(scrapes.active), metrics_max_active=max(scrapes.active, default=None),
        metrics_max_queue=max(scrapes.queue, default=None),
        metrics_chat_requests_first=scrapes.chat_requests[0] if scrapes.chat_requests else None,
        metrics_chat_requests_last=scrapes.chat_requests[-1] if scrapes.chat_requests else None,
        server_log_5xx_other_than_503=len(server_5xx),
    )
    report(**figures)

    assert len(done) == sizes.load_requests, f"only {len(done)} of {sizes.load_requests} ran before the deadline"
    assert not bad, "answers that were neither a complete stream nor a 503:\n" + "\n".join(
        f"#{o.i} {o.dialect} {o.status}: {o.problem}" for o in bad[:20])
    assert not crosstalk, f"outputs carrying another request's nonce: {crosstalk[:20]}"
    assert ok, "no request completed"
    assert not server_5xx, f"the access log shows 5xx answers: {server_5xx[:10]}"
    # /metrics saw the load, and never more than the settings allow
    assert not scrapes.errors, scrapes.errors[:5]
    assert len(scrapes.active) >= 2, "/metrics was scraped fewer than twice"
    assert max(scrapes.active) > 0 or max(scrapes.queue) > 0, "/metrics never showed a request in flight"
    assert scrapes.chat_requests[-1] > scrapes.chat_requests[0], "kiln_requests_total did not grow"
    assert max(scrapes.active) <= NUM_PARALLEL and max(scrapes.queue) <= MAX_QUEUE
    # the server is still well after the load
    assert greedy_chat(s.url).status_code == 200
