"""The queue-overflow check (kiln only): more concurrent clients than slots + queue.

With ``num_parallel`` slots and a queue bound of ``max_queue``, ``n`` simultaneous
requests should give exactly ``n - num_parallel - max_queue`` 503s (Ollama's "server
busy" with ``Retry-After``, in each dialect's error shape), and every admitted request
should end normally (any finish reason but an error) with its own text.

"Its own text" is checked against references: each prompt run alone first, greedy.
Batched logits are not bit-identical to unbatched ones (llama.cpp's README says so
for cache_prompt too), so a batched answer may drift from its reference after a
while; what must never happen is an empty answer, an abnormal ending, or an answer
that resembles ANOTHER request's reference more than its own (crossed streams).
"""

from __future__ import annotations

import asyncio
import difflib
from typing import Any

from bench import load, workload

GREEDY = load.Sampling(max_tokens=64, temperature=0.0, top_p=1.0)


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _shape_ok(api: str, body: Any) -> bool:
    """Ollama: ``{"error": "..."}``; OpenAI: ``{"error": {"message", "type", ...}}``."""
    if not isinstance(body, dict):
        return False
    err = body.get("error")
    if api == "ollama":
        return isinstance(err, str) and bool(err)
    return isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err


async def references(url: str, model: str, n: int) -> list[str]:
    """Each overflow prompt alone (concurrency 1), greedy."""
    out = []
    async with load.client(1) as c:
        for i in range(n):
            o = await load.request(c, url, "openai", model, workload.overflow_messages(i), GREEDY)
            out.append(o.text if o.kind == "completed" else "")
    return out


async def burst(url: str, api: str, model: str, refs: list[str], parallel: int,
                max_queue: int) -> dict[str, Any]:
    n = len(refs)
    async with load.client(n) as c:
        outcomes = await asyncio.gather(*(load.request(c, url, api, model, workload.overflow_messages(i),
                                                       GREEDY) for i in range(n)))
    rejected = [o for o in outcomes if o.kind == "rejected"]
    admitted = [(i, o) for i, o in enumerate(outcomes) if o.status == 200]
    checks = []
    for i, o in admitted:
        sims = [_similarity(o.text, r) for r in refs]
        own = sims[i]
        crossed = [j for j, sim in enumerate(sims) if j != i and sim > own]
        checks.append({"index": i, "finish_reason": o.finish_reason, "tokens": o.tokens,
                       "identical": o.text == refs[i], "similarity_own": round(own, 3),
                       "crossed_with": crossed, "empty": not o.text.strip(), "kind": o.kind})
    # A normal end is any finish reason but an error: "stop" or "length" (an answer kiln's
    # loop guard cut is "length" too; X-Kiln-Finish-Reason says "loop").
    bad_output = [ch for ch in checks
                  if ch["kind"] != "completed" or ch["empty"] or ch["crossed_with"]
                  or ch["finish_reason"] in ("error", "cancelled")]
    expected = max(0, n - parallel - max_queue)
    result = {
        "api": api, "clients": n, "num_parallel": parallel, "max_queue": max_queue,
        "expected_503": expected, "got_503": len(rejected),
        "503_retry_after": sum(1 for o in rejected if o.retry_after),
        "503_shape_ok": sum(1 for o in rejected if _shape_ok(api, o.error_body)),
        "503_body_sample": rejected[0].error_body if rejected else None,
        "admitted": len(admitted), "admitted_ok": len(admitted) - len(bad_output),
        "finish_reasons": {r: sum(1 for ch in checks if ch["finish_reason"] == r)
                           for r in sorted({str(ch["finish_reason"]) for ch in checks})},
        "identical_to_reference": sum(1 for ch in checks if ch["identical"]),
        "other_errors": sum(1 for o in outcomes if o.kind in ("error", "cut_short")),
        "error_samples": sorted({o.error for o in outcomes if o.error and o.kind != "rejected"})[:3],
        "bad_outputs": bad_output, "checks": checks,
    }
    result["met"] = (result["got_503"] == expected and expected > 0
                     and result["503_retry_after"] == len(rejected)
                     and result["503_shape_ok"] == len(rejected)
                     and not bad_output and result["other_errors"] == 0)
    return result


async def run(url: str, model: str, n: int, parallel: int, max_queue: int,
              apis: tuple[str, ...] = ("openai", "ollama")) -> dict[str, Any]:
    refs = await references(url, model, n)
    bursts = [await burst(url, api, model, refs, parallel, max_queue) for api in apis]
    return {"references_empty": sum(1 for r in refs if not r), "bursts": bursts,
            "met": all(b["met"] for b in bursts) and all(refs)}
