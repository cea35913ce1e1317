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

Model management over an Ollama/kiln upstream (``api = "ollama"``) is that node's own:
``/api/show`` and ``/api/ps`` answer with what the node says (its template, model_info,
digest, expiry), with kiln's ``kiln`` field saying where the model runs; a load, an
unload (``keep_alive: 0``), ``/api/copy`` and ``/api/delete`` are sent on to the
replicas. Copy and delete change every replica that serves the model, so they are
refused while one of them is down (a fleet half-copied is worse than an error), and
for an upstream whose models the config file names (the names are the config's). An
OpenAI upstream has none of these APIs: its models are shown from what kiln knows,
load and unload are answered without being sent, copy and delete refused.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import httpx

from backends.base import Chunk
from backends.store import Manifest
from backends.upstream import Replica, Upstream, UpstreamBackend, UpstreamPool, UpstreamUnavailable, key
from backends.upstream_wire import UpstreamRequest
from server.errors import BadRequest, KilnError, Unavailable
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
    return key(name)


def _keep_alive(keep: float | None) -> float | None:
    """kiln's keep_alive (seconds, ``inf`` for forever) as Ollama takes it (-1 for forever)."""
    return -1 if keep is not None and math.isinf(keep) else keep


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
    if inf.prompt_ids is not None:
        raise BadRequest("a prompt of token ids cannot be sent to an upstream model: its tokenizer is not kiln's; "
                         "give the prompt as text")
    if inf.logprobs is not None or inf.logit_bias:
        raise BadRequest("logprobs and logit_bias are not available for an upstream model: kiln does not relay them")
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
    req = UpstreamRequest(
        prompt=inf.prompt or "", sampling=resolve({}, options).sampling, messages=inf.messages,
        tools=inf.tools if fns else None, format=inf.format,
        # the policy's choice too ("required-then-auto" forces a call on a new question)
        tool_choice=(inf.tool_choice if inf.tool_choice is not None else "required" if forced else None) if fns
        else None,
        options=options, keep_alive=_keep_alive(inf.keep_alive), think=inf.think,
        system=inf.system, suffix=inf.suffix, raw=inf.raw, whole=not getattr(inf, "stream", True),
        affinity=affinity(inf))
    if inf.format is not None:  # held to a format: the loop guard spares JSON structure (see _Run)
        req.json_schema = {"type": "object"} if inf.format == "json" else inf.format
    # Calls come back as Hermes text (backends/upstream_wire.py); parsed the same whether forced or not.
    tool_stream = ToolStream(fns, forced=False) if fns else None
    return Prepared(m, inf, req, None, policy, notes, tool_stream)


async def stream(service: Service, inf: Inference) -> AsyncGenerator[Any, None]:
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


async def embed(service: Service, model: str, texts: Sequence[str | list[int]]) -> Embedded:
    t0 = time.monotonic_ns()
    if any(not isinstance(t, str) for t in texts):
        raise BadRequest("token ids cannot be embedded by an upstream model: its tokenizer is not kiln's; "
                         "give the input as text")
    if not texts:
        return Embedded([], 0, time.monotonic_ns() - t0, 0)
    try:
        out = await UpstreamBackend(pool(service), model).embed([t for t in texts if isinstance(t, str)])  # type: ignore[arg-type]
    except UpstreamUnavailable as e:
        raise Unavailable(str(e), headers={"Retry-After": str(e.retry_after)}) from None
    return Embedded(out.vectors, out.prompt_tokens, time.monotonic_ns() - t0, 0)


# -- the one catalogue -------------------------------------------------------------------

def listing(service: Service, entry: Callable[[Manifest], dict[str, Any]], native: bool = False) -> list[dict[str, Any]]:
    """``/api/tags`` and ``/v1/models``: local models, then upstream ones, each saying
    where it runs (a ``kiln`` field, which clients ignore). Unchanged without upstreams.
    ``native``: Ollama's tag entries, where an Ollama/kiln node's own (size, digest,
    details) are passed on under kiln's name."""
    local = service.store.list()
    p = pool(service)
    if p is None:
        return [entry(m) for m in local]
    out = [{**entry(m), "kiln": {"location": "local"}} for m in local if p.find(m.name) is None]
    for name, u in p.models():
        m = manifest(service, name)
        tag = _tag(u, u.model_id(name) or name) if native else None
        out.append({**(tag or entry(m)), "name": name, "model": name, "kiln": m.extra} if tag
                   else {**entry(m), "kiln": m.extra})
    return out


def _tag(u: Upstream, model_id: str) -> dict[str, Any] | None:
    return next((r.tags[key(model_id)] for r in u.replicas if key(model_id) in r.tags), None)


def get(service: Service, name: str) -> Manifest:
    """A model by name, upstream first (see the module's note on shadowing)."""
    return manifest(service, name) if serves(service, name) else service.store.get(name)


class Refused(KilnError):
    """An Ollama/kiln upstream's own error answer, passed on with its status."""

    def __init__(self, u: Upstream, resp: httpx.Response) -> None:
        try:
            err = resp.json().get("error", resp.text)
            message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            message = resp.text[:500]
        super().__init__(f"upstream {u.config.name}: {message}")
        self.status = resp.status_code if 400 <= resp.status_code < 600 else 502


def _native(service: Service, name: str, every: bool = False) -> tuple[UpstreamPool, Upstream, str, list[Replica]]:
    """The pool, upstream, model id and replicas up of an Ollama/kiln upstream's model,
    or 503 if none is up. ``every``: all replicas that serve it must be up."""
    p = pool(service)
    assert p is not None
    n = p.native(name)
    assert n is not None
    u, mid, reps = n
    down = [r.base for r in u.replicas if not r.up and r.serves(mid)]
    if not reps or (every and down):
        retry = {"Retry-After": str(max(1, math.ceil(u.config.probe_interval)))}
        raise Unavailable(f"upstream '{u.config.name}': {', '.join(down) or 'no replica'} down for {mid}"
                          + ("; nothing was changed" if every else ""), headers=retry)
    return p, u, mid, reps


async def _call(p: UpstreamPool, r: Replica, *args: Any, **kw: Any) -> httpx.Response:
    try:
        return await p.call(r, *args, **kw)
    except UpstreamUnavailable as e:  # the replica went away: 503 + Retry-After, as for a generation
        raise Unavailable(str(e), headers={"Retry-After": str(e.retry_after)}) from None


def is_native(service: Service, name: str) -> bool:
    p = pool(service)
    return p is not None and p.native(name) is not None


async def show(service: Service, name: str, verbose: bool = False) -> dict[str, Any]:
    m = manifest(service, name)
    if is_native(service, name):  # the node's own answer: template, model_info, parameters, details
        p, u, mid, reps = _native(service, name)
        resp = await _call(p, reps[0], "POST", "/api/show", {"model": mid, "verbose": verbose})
        if resp.status_code != 200:
            raise Refused(u, resp)
        out = resp.json()
        out["kiln"] = {**(out.get("kiln") or {}), **m.extra}
        return out
    return {"modelfile": "", "parameters": "", "template": "", "license": "",
            "details": {"parent_model": "", "format": "upstream", "family": "", "families": None,
                        "parameter_size": "", "quantization_level": ""},
            "model_info": {}, "capabilities": m.capabilities, "modified_at": m.modified.isoformat(),
            "kiln": m.extra}


async def load_or_unload(service: Service, name: str, keep_alive: float | None) -> str:
    """Ollama's empty request: "load" on one replica (the one that has it, else the
    first up), "unload" (``keep_alive`` 0) on every replica up. An OpenAI upstream
    has no such API: answered, not sent."""
    if not is_native(service, name):
        return "unload" if keep_alive == 0 else "load"
    p, u, mid, reps = _native(service, name)
    body: dict[str, Any] = {"model": mid}
    if keep_alive is not None:
        body["keep_alive"] = _keep_alive(keep_alive)
    targets = reps if keep_alive == 0 else reps[:1]
    replies = await asyncio.gather(*(_call(p, r, "POST", "/api/generate", body, timeout=u.config.first_token_timeout)
                                     for r in targets))
    await p.refresh(u)
    for resp in replies:
        if resp.status_code != 200:
            raise Refused(u, resp)
    return "unload" if keep_alive == 0 else "load"


async def copy(service: Service, source: str, destination: str) -> None:
    """``/api/copy`` of an upstream model: the copy is made on every replica that has it."""
    _managed(service, source, "copied")
    p, u, mid, reps = _native(service, source, every=True)
    replies = await asyncio.gather(*(_call(p, r, "POST", "/api/copy", {"source": mid, "destination": destination})
                                     for r in reps))
    await p.refresh(u)
    for resp in replies:
        if resp.status_code != 200:
            raise Refused(u, resp)


async def delete(service: Service, name: str) -> None:
    """``/api/delete`` of an upstream model: deleted on every replica that has it (a local
    model of the same name, shadowed, stays)."""
    _managed(service, name, "deleted")
    p, u, mid, reps = _native(service, name, every=True)
    replies = await asyncio.gather(*(_call(p, r, "DELETE", "/api/delete", {"model": mid}) for r in reps))
    await p.refresh(u)
    for resp in replies:
        if resp.status_code != 200:
            raise Refused(u, resp)


def _managed(service: Service, name: str, what: str) -> None:
    p = pool(service)
    assert p is not None
    u = p.find(name)
    assert u is not None
    if u.config.api != "ollama":
        raise BadRequest(f"'{name}' is served by upstream '{u.config.name}' (api = \"openai\"), "
                         f"which has no API for models to be {what} through")
    if u.configured is not None:
        raise BadRequest(f"the models of upstream '{u.config.name}' are named in the config file: "
                         f"'{name}' cannot be {what} through kiln; change it on the node and in the config")


async def ps_entries(service: Service) -> list[dict[str, Any]]:
    """``/api/ps``: upstream models that are loaded somewhere, each with the replicas that
    have it and the requests this gateway has in flight for it. Ollama/kiln nodes are
    asked now (their own entries: expiry, context, digest); an OpenAI server serves
    what it lists."""
    p = pool(service)
    if p is None:
        return []
    live: dict[tuple[int, str], tuple[dict[str, Any], list[str]]] = {}  # (upstream, key) -> entry, replicas

    async def ask(u: Upstream, r: Replica) -> None:
        try:
            resp = await _call(p, r, "GET", "/api/ps", timeout=2.0)
            models = resp.json().get("models") or [] if resp.status_code == 200 else []
        except (Unavailable, ValueError, AttributeError):
            return
        for e in models:
            mid = e.get("name") or e.get("model") if isinstance(e, dict) else None
            if isinstance(mid, str):
                live.setdefault((id(u), key(mid)), (e, []))[1].append(r.base)

    await asyncio.gather(*(ask(u, r) for u in p.upstreams if u.config.api == "ollama" for r in u.replicas if r.up))
    out = []
    for name, u in p.models():
        where = {**p.where(name), "requests": p.active.get(key(name), 0)}
        if u.config.api == "ollama":
            found = live.get((id(u), key(u.model_id(name) or name)))
            if found is None:
                continue
            entry, bases = found
            out.append({**entry, "name": name, "model": name,
                        "kiln": {**(entry.get("kiln") or {}), **where, "loaded_on": bases}})
            continue
        if not where.get("loaded_on"):
            continue
        out.append({"name": name, "model": name, "size": 0, "digest": "", "expires_at": "0001-01-01T00:00:00Z",
                    "size_vram": 0, "context_length": 0,
                    "details": {"parent_model": "", "format": "upstream", "family": "", "families": None,
                                "parameter_size": "", "quantization_level": ""},
                    "kiln": where})
    return out
