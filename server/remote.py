"""Generation and the catalogue for models served by ``[[upstreams]]`` (backends/upstream.py).

``Service.stream`` hands a request for an upstream model to ``stream`` here. It builds
an ``UpstreamRequest`` — the client's messages, tools and format with kiln's policy
applied to the options — instead of a rendered prompt (the upstream owns the model's
template and tokenizer: see backends/upstream_wire.py), then runs the upstream's chunks
through the same ``_Run`` as a local model: loop guard, thinking and tool-call
splitting, metrics and the access log.

The upstream's first chunk is awaited before ``Ready``: replica choice, connection,
re-sending and the first-token timeout all happen while the client has nothing yet,
so "every replica is down or busy" is still a 503 with ``Retry-After`` and a replica
that fails before its first token costs the client nothing but time.

A model an upstream serves shadows a local model of the same name: the administrator
configured the upstream to serve it (a front node of a fleet has the bundled model
too), and listing one name twice would be ambiguous.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from backends.base import Chunk
from backends.store import Manifest
from backends.upstream import UpstreamBackend, UpstreamPool, UpstreamUnavailable
from backends.upstream_wire import UpstreamRequest
from server.errors import BadRequest, Unavailable
from server.inference import Embedded, Inference, Prepared, Ready, Service, _Run
from server.options import resolve
from server.policy import apply, merge
from server.tools import ToolStream

AFFINITY_CHARS = 2048  # enough of the system prompt and first question to tell sessions apart


def pool(service: Service) -> UpstreamPool | None:
    return getattr(service, "upstreams", None)


def serves(service: Service, name: str) -> bool:
    p = pool(service)
    return p is not None and p.find(name) is not None


def manifest(service: Service, name: str) -> Manifest:
    """A stand-in manifest: what the catalogue lists and ``_Run`` reads (name, policy)."""
    p = pool(service)
    assert p is not None
    shown = next((n for n, _ in p.models() if _key(n) == _key(name)), name)
    return Manifest(name=shown, backend="upstream", format="upstream", files=[], context_length=0,
                    capabilities=["completion", "tools"], extra=p.where(name))


def _key(name: str) -> str:
    from backends.upstream import key

    return key(name)


def affinity(inf: Inference) -> str | None:
    """A session's identity for prefix affinity: the system prompt and the first user
    message. Only for what looks like a session (a system prompt, or more than one
    message): single unrelated questions are balanced by load alone, evenly."""
    if inf.messages:
        system = next((m.get("content") for m in inf.messages if m.get("role") == "system"), None)
        first = next((m.get("content") for m in inf.messages if m.get("role") == "user"), None)
        if system is None and len(inf.messages) < 2:
            return None
        return f"{inf.model}\0{system}\0{first}"[:AFFINITY_CHARS]
    if inf.system:
        return f"{inf.model}\0{inf.system}\0{inf.prompt}"[:AFFINITY_CHARS]
    return None


def _request(service: Service, inf: Inference) -> Prepared:
    if inf.images:
        raise BadRequest(f'"{inf.model}" does not support images')
    if inf.template:
        raise BadRequest("template cannot be set for an upstream model: the upstream applies its own")
    if inf.context:
        raise BadRequest("context (token ids) cannot be sent to an upstream model: its tokenizer is not kiln's; "
                         "send the conversation with /api/chat instead")
    m = manifest(service, inf.model)
    try:
        policy = merge(service.settings.policy, m.policy)
    except ValueError as e:
        raise BadRequest(f"invalid generation policy for {m.name}: {e}") from None
    options, notes = apply(policy, dict(inf.options))
    for name, value in inf.fallback.items():  # the dialect's defaults, as Service.prepare applies them
        if name not in options:
            options[name] = value
            notes.append(f"{name}={value} ({inf.fallback_from})")
    fns, forced = Service._tools(inf, policy)
    keep = inf.keep_alive
    req = UpstreamRequest(
        prompt=inf.prompt or "", sampling=resolve({}, options).sampling, messages=inf.messages,
        tools=inf.tools if fns else None, format=inf.format,
        # the policy's choice too ("required-then-auto" forces a call on a new question)
        tool_choice=(inf.tool_choice if inf.tool_choice is not None else "required" if forced else None) if fns
        else None,
        options=options, keep_alive=(-1 if keep is not None and math.isinf(keep) else keep), think=inf.think,
        system=inf.system, suffix=inf.suffix, raw=inf.raw, whole=not getattr(inf, "stream", True),
        affinity=affinity(inf))
    if inf.format is not None:  # held to a format: the loop guard spares JSON structure (see _Run)
        req.json_schema = {"type": "object"} if inf.format == "json" else inf.format
    # Calls come back as Hermes text (backends/upstream_wire.py); parsed the same whether forced or not.
    tool_stream = ToolStream(fns, forced=False) if fns else None
    return Prepared(m, inf, req, None, policy, notes, tool_stream)


async def stream(service: Service, inf: Inference) -> AsyncIterator[Any]:
    """``Service.stream`` for an upstream model: ``Ready``, ``Chunk``s, then a ``Result``."""
    t0 = time.monotonic_ns()
    trace = inf.trace if inf.trace is not None else {}
    trace["model"] = inf.model
    p = _request(service, inf)
    backend = UpstreamBackend(pool(service), inf.model)  # type: ignore[arg-type]
    chunks = backend.stream(p.request)
    try:
        try:
            first: Chunk | None = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except UpstreamUnavailable as e:
            raise Unavailable(str(e), headers={"Retry-After": str(e.retry_after)}) from None
        yield Ready(p.notes)
        run = _Run(service, p, trace, t0, 0)
        try:
            if first is not None:
                out = run.take(first)
                if out is not None:
                    yield out
            while not run.done:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                out = run.take(chunk)
                if out is not None:
                    yield out
        except BaseException as e:
            run.failed(e)
            raise
        rest, result = run.finish(0)
        if rest is not None:
            yield rest
        yield result
    finally:
        await chunks.aclose()  # closes the upstream's connection now, not when collected


async def embed(service: Service, model: str, texts: list[str]) -> Embedded:
    t0 = time.monotonic_ns()
    if not texts:
        return Embedded([], 0, time.monotonic_ns() - t0, 0)
    try:
        out = await UpstreamBackend(pool(service), model).embed(texts)  # type: ignore[arg-type]
    except UpstreamUnavailable as e:
        raise Unavailable(str(e), headers={"Retry-After": str(e.retry_after)}) from None
    return Embedded(out.vectors, out.prompt_tokens, time.monotonic_ns() - t0, 0)


# -- the one catalogue -------------------------------------------------------------------

def listing(service: Service, entry: Callable[[Manifest], dict[str, Any]]) -> list[dict[str, Any]]:
    """``/api/tags`` and ``/v1/models``: local models, then upstream ones, each saying
    where it runs (a ``kiln`` field, which clients ignore). Unchanged without upstreams."""
    local = service.store.list()
    p = pool(service)
    if p is None:
        return [entry(m) for m in local]
    out = [{**entry(m), "kiln": {"location": "local"}} for m in local if p.find(m.name) is None]
    for name, _ in p.models():
        m = manifest(service, name)
        out.append({**entry(m), "kiln": m.extra})
    return out


def get(service: Service, name: str) -> Manifest:
    """A model by name, upstream first (see the module's note on shadowing)."""
    return manifest(service, name) if serves(service, name) else service.store.get(name)


def show(service: Service, name: str) -> dict[str, Any]:
    m = manifest(service, name)
    return {"modelfile": "", "parameters": "", "template": "", "license": "",
            "details": {"parent_model": "", "format": "upstream", "family": "", "families": None,
                        "parameter_size": "", "quantization_level": ""},
            "model_info": {}, "capabilities": m.capabilities, "modified_at": m.modified.isoformat(),
            "kiln": m.extra}


def ps_entries(service: Service) -> list[dict[str, Any]]:
    """``/api/ps``: upstream models that are loaded somewhere (Ollama/kiln report it; an
    OpenAI server serves what it lists), with the replicas that have them."""
    p = pool(service)
    if p is None:
        return []
    out = []
    for name, _ in p.models():
        where = p.where(name)
        if not where.get("loaded_on"):
            continue
        out.append({"name": name, "model": name, "size": 0, "digest": "", "expires_at": "0001-01-01T00:00:00Z",
                    "size_vram": 0, "context_length": 0,
                    "details": {"parent_model": "", "format": "upstream", "family": "", "families": None,
                                "parameter_size": "", "quantization_level": ""},
                    "kiln": where})
    return out
