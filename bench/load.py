"""The load generator: asyncio + httpx, streaming requests, one record per request.

Each request streams (SSE on OpenAI's ``/v1/chat/completions``, NDJSON on Ollama's
``/api/chat``) and records its time to first token (TTFT: the first NON-EMPTY content
delta, since OpenAI servers open with an empty role delta), its completion tokens and
how it ended. Tokens come from the server's usage (``stream_options.include_usage`` /
``eval_count``) when it reports one, else from the number of content deltas (one per
token for llama-cpp-python's server, which reports no usage when streaming).

Every request is bounded: httpx timeouts on connect/read, and a total deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench import workload

Message = dict[str, str]


@dataclass(frozen=True)
class Sampling:
    """Sent to every target as the OpenAI fields (Ollama: options); the rest of each
    server's sampling defaults apply (they differ: min_p, top_k, repeat penalty)."""

    max_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None


@dataclass
class Outcome:
    """One request. ``kind``: completed (a finish reason arrived), cut_short (the stream
    ended cleanly but without one, as llama-cpp-python's interrupt does), rejected
    (HTTP 503), error (anything else: other statuses, transport errors, timeouts,
    in-stream errors)."""

    status: int = 0
    ttft: float | None = None  # seconds from sending to the first non-empty content
    latency: float = 0.0  # seconds from sending to the end of the stream
    tokens: int = 0
    token_source: str = "chunks"  # "usage" or "chunks"
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    retry_after: str | None = None
    error_body: Any = None

    @property
    def kind(self) -> str:
        if self.status == 503:
            return "rejected"
        if self.status != 200 or self.error:
            return "error"
        return "completed" if self.finish_reason else "cut_short"

    def record(self, keep_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind
        if not keep_text:
            d["text"] = self.text[:80]
        return d


def _body(api: str, model: str, messages: list[Message], s: Sampling) -> dict[str, Any]:
    if api == "ollama":
        options: dict[str, Any] = {"num_predict": s.max_tokens, "temperature": s.temperature,
                                   "top_p": s.top_p}
        if s.seed is not None:
            options["seed"] = s.seed
        return {"model": model, "messages": messages, "stream": True, "options": options}
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}, "max_tokens": s.max_tokens,
                            "temperature": s.temperature, "top_p": s.top_p}
    if s.seed is not None:
        body["seed"] = s.seed
    return body


def _add_text(o: Outcome, text: str, t0: float, chunks: list[int]) -> None:
    """Counts one content delta; the first non-empty one sets the TTFT."""
    if text:
        o.ttft = o.ttft if o.ttft is not None else time.perf_counter() - t0
        o.text += text
        chunks[0] += 1


def _openai_event(o: Outcome, data: str, t0: float, chunks: list[int]) -> bool:
    """Applies one SSE ``data:`` payload; True at ``[DONE]``."""
    if data == "[DONE]":
        return True
    obj = json.loads(data)
    if "error" in obj:
        o.error = str(obj["error"])
        return False
    for choice in obj.get("choices") or []:
        _add_text(o, (choice.get("delta") or {}).get("content") or "", t0, chunks)
        if choice.get("finish_reason"):
            o.finish_reason = choice["finish_reason"]
    usage = obj.get("usage")
    if usage:
        o.tokens, o.token_source = int(usage.get("completion_tokens") or 0), "usage"
        o.prompt_tokens = usage.get("prompt_tokens")
    return False


def _ollama_line(o: Outcome, line: str, t0: float, chunks: list[int]) -> bool:
    """Applies one NDJSON line; True on the ``done`` line."""
    obj = json.loads(line)
    if "error" in obj:
        o.error = str(obj["error"])
        return True
    _add_text(o, (obj.get("message") or {}).get("content") or "", t0, chunks)
    if obj.get("done"):
        o.finish_reason = obj.get("done_reason") or "stop"
        if "eval_count" in obj:
            o.tokens, o.token_source = int(obj["eval_count"]), "usage"
        o.prompt_tokens = obj.get("prompt_eval_count")
        return True
    return False


async def _stream(client: httpx.AsyncClient, url: str, api: str, model: str,
                  messages: list[Message], s: Sampling, o: Outcome) -> None:
    path = "/api/chat" if api == "ollama" else "/v1/chat/completions"
    t0 = time.perf_counter()
    chunks = [0]
    try:
        async with client.stream("POST", url + path, json=_body(api, model, messages, s)) as r:
            o.status = r.status_code
            if r.status_code != 200:
                raw = await r.aread()
                o.retry_after = r.headers.get("retry-after")
                try:
                    o.error_body = json.loads(raw)
                except ValueError:
                    o.error_body = raw.decode(errors="replace")[:500]
                o.error = f"HTTP {r.status_code}"
                return
            async for line in r.aiter_lines():
                if api == "ollama":
                    if line.strip() and _ollama_line(o, line, t0, chunks):
                        break
                elif line.startswith("data:") and _openai_event(o, line[5:].strip(), t0, chunks):
                    break
    finally:
        o.latency = time.perf_counter() - t0
        if o.token_source == "chunks":
            o.tokens = chunks[0]


async def request(client: httpx.AsyncClient, url: str, api: str, model: str,
                  messages: list[Message], s: Sampling, deadline: float = 300.0) -> Outcome:
    """One streamed chat request; never raises, failures are in the Outcome."""
    o = Outcome()
    try:
        await asyncio.wait_for(_stream(client, url, api, model, messages, s, o), deadline)
    except TimeoutError:
        o.error = f"timed out after {deadline:.0f}s"
    except (httpx.HTTPError, ValueError) as e:  # transport errors, bad JSON in the stream
        o.error = f"{type(e).__name__}: {e}"
    return o


def client(n: int) -> httpx.AsyncClient:
    """A client with room for ``n`` simultaneous streams and bounded waits. The read
    timeout is long: a server may send nothing during a cold 2,000-token prefill, which
    takes minutes on a loaded two-core machine."""
    return httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=300.0),
                             limits=httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4))


# -- rounds -----------------------------------------------------------------------

def _pct(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass
class Round:
    concurrency: int
    requests: int
    wall: float
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        kinds = [o.kind for o in self.outcomes]
        ok = [o for o in self.outcomes if o.status == 200 and not o.error]
        done = [o for o in ok if o.finish_reason]
        ttfts = [o.ttft for o in ok if o.ttft is not None]
        tokens = sum(o.tokens for o in ok)  # cut-short streams generated these too
        return {
            "concurrency": self.concurrency, "requests": self.requests, "wall_s": self.wall,
            "tokens": tokens, "agg_tok_s": tokens / self.wall if self.wall else 0.0,
            "ttft_p50_s": _pct(ttfts, 50), "ttft_p95_s": _pct(ttfts, 95),
            "ttft_n": len(ttfts),  # streams that delivered a token: a cut-short one may not
            "mean_completion_tokens": sum(o.tokens for o in done) / len(done) if done else None,
            "stopped_early": sum(1 for o in done if o.finish_reason == "stop"),
            "token_source": sorted({o.token_source for o in ok}),
            "completed": kinds.count("completed"), "cut_short": kinds.count("cut_short"),
            "rejected": kinds.count("rejected"), "errors": kinds.count("error"),
            "error_samples": sorted({o.error for o in self.outcomes if o.error})[:3],
        }


async def run_round(url: str, api: str, model: str, concurrency: int, per_client: int,
                    s: Sampling, tag: str) -> Round:
    """``concurrency`` clients, each sending ``per_client`` requests back to back (a
    closed loop: the server always has ``concurrency`` requests in flight); every
    request has a distinct prompt, tagged with ``tag`` (unique per round)."""
    async with client(concurrency) as c:
        async def one_client(k: int) -> list[Outcome]:
            out = []
            for j in range(per_client):
                i = k * per_client + j
                seed = None if s.seed is None else s.seed + i
                out.append(await request(c, url, api, model, workload.essay_messages(i, tag),
                                         Sampling(s.max_tokens, s.temperature, s.top_p, seed)))
            return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return Round(concurrency, concurrency * per_client, wall, [o for r in results for o in r])


async def warm_up(url: str, api: str, model: str, concurrency: int) -> list[str]:
    """Loads the model (kiln loads lazily) and touches every slot once; the errors seen."""
    s = Sampling(max_tokens=8)
    async with client(concurrency) as c:
        first = await request(c, url, api, model, workload.essay_messages(0, "warm-up"), s,
                              deadline=600)
        burst = await asyncio.gather(*(request(c, url, api, model, workload.essay_messages(1 + i, "warm-up"), s)
                                       for i in range(concurrency)))
    return [o.error for o in [first, *burst] if o.error]


# -- the two-turn agent pattern ------------------------------------------------------

async def agent_session(url: str, api: str, model: str, nonce: str, s: Sampling) -> dict[str, Any]:
    """Turn 1 on a cold 2,000-token system prompt, turn 2 on the same prefix plus the
    first exchange; the second TTFT over the first shows prefix reuse."""
    system = workload.agent_system_prompt(nonce)
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": workload.AGENT_TURN_1}]
    async with client(1) as c:
        first = await request(c, url, api, model, turn1, s)
        turn2 = turn1 + [{"role": "assistant", "content": first.text},
                         {"role": "user", "content": workload.AGENT_TURN_2}]
        second = await request(c, url, api, model, turn2, s)
    ratio = (second.ttft / first.ttft) if first.ttft and second.ttft else None
    return {"nonce": nonce, "first": first.record(), "second": second.record(),
            "ttft_first_s": first.ttft, "ttft_second_s": second.ttft, "ratio": ratio,
            "prompt_tokens_first": first.prompt_tokens, "prompt_tokens_second": second.prompt_tokens,
            "errors": [o.error for o in (first, second) if o.error]}
