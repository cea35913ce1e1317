"""Ollama's native API (``/api/*``): thin handlers over the service and the store."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from backends.base import Chunk
from backends.store import ModelName
from server import __version__, models, remote
from server.errors import BadRequest, NotFound
from server.options import check
from server.inference import Inference, Result, Service
from server.ollama import translate
from server.ollama.protocol import (
    ChatRequest,
    CopyRequest,
    CreateRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRequest,
)
from server.routing import JSONBodyRoute, trace
from server.streaming import NDJSON, guarded, ndjson_line, respond, stream_response

router = APIRouter(route_class=JSONBodyRoute)


def _service(request: Request) -> Service:
    return request.app.state.service


@router.get("/", response_class=PlainTextResponse, include_in_schema=False)
@router.head("/", include_in_schema=False)
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.get("/api/version")
@router.head("/api/version", include_in_schema=False)
async def version() -> dict[str, str]:
    return {"version": __version__.OLLAMA_COMPAT}


# -- generation ---------------------------------------------------------------------

async def _run(request: Request, inf: Inference, stream: bool, chunk_fn: Any, final_fn: Any) -> Response:
    inf.trace = trace(request)
    inf.stream = stream

    def encode(item: Any) -> bytes | None:
        if isinstance(item, Chunk):
            return ndjson_line(chunk_fn(inf.model, item)) if item.text or item.thinking else None
        if isinstance(item, Result):
            calls = ndjson_line(translate.chat_tool_chunk(inf.model, item)) if item.tool_calls else b""
            return calls + ndjson_line(final_fn(inf.model, item))
        return None

    return await respond(request, _service(request).stream(inf), stream=stream, media_type=NDJSON,
                         encode=encode, on_error=lambda msg: ndjson_line({"error": msg}),
                         whole=lambda text, r: final_fn(inf.model, r, text, whole=True))


async def _load_or_unload(request: Request, model: str, keep_alive: float | None, chat: bool) -> Response:
    """An empty prompt/messages loads the model (or with keep_alive 0 unloads it);
    Ollama answers with one JSON object, streaming asked for or not."""
    service = _service(request)
    if remote.serves(service, model):  # sent on to an Ollama/kiln upstream (server/remote.py)
        return JSONResponse(translate.load_reply(model, await remote.load_or_unload(service, model, keep_alive),
                                                 chat=chat))
    manifest = service.store.get(model)
    if keep_alive == 0:
        await service.scheduler.unload(manifest.name)
        return JSONResponse(translate.load_reply(model, "unload", chat=chat))
    await service.scheduler.load(manifest, keep_alive=keep_alive)
    return JSONResponse(translate.load_reply(model, "load", chat=chat))


@router.post("/api/chat")
async def chat(request: Request, body: ChatRequest) -> Response:
    if not body.model:
        raise BadRequest("model is required")
    inf = translate.chat_to_internal(body)
    stream = body.stream is not False
    if not inf.messages:
        return await _load_or_unload(request, body.model, inf.keep_alive, chat=True)
    return await _run(request, inf, stream, translate.chat_chunk, translate.chat_final)


@router.post("/api/generate")
async def generate(request: Request, body: GenerateRequest) -> Response:
    if not body.model:
        raise NotFound("model '' not found")
    inf = translate.generate_to_internal(body)
    stream = body.stream is not False
    if not inf.prompt and not inf.images:
        return await _load_or_unload(request, body.model, inf.keep_alive, chat=False)
    return await _run(request, inf, stream, translate.generate_chunk, translate.generate_final)


# -- embeddings -----------------------------------------------------------------------

def _normalise(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n > 0 else v


@router.post("/api/embed")
async def embed(request: Request, body: EmbedRequest) -> dict[str, Any]:
    if not body.model:
        raise BadRequest("model is required")
    # Ollama: an empty string is no input at all (embeddings: []), like an empty list
    texts = ([body.input] if body.input else []) if isinstance(body.input, str) else list(body.input or [])
    if body.dimensions is not None and body.dimensions <= 0:
        raise BadRequest("dimensions must be a positive integer")
    out = await _service(request).embed(body.model, texts, keep_alive=translate.keep_alive(body.keep_alive),
                                        options=check(body.options))
    vectors = [v[: body.dimensions] for v in out.vectors] if body.dimensions else out.vectors
    return {"model": body.model, "embeddings": [_normalise(v) for v in vectors],
            "total_duration": out.total_ns, "load_duration": out.load_ns, "prompt_eval_count": out.prompt_tokens}


@router.post("/api/embeddings")
async def embeddings(request: Request, body: EmbeddingsRequest) -> dict[str, Any]:
    if not body.model:
        raise BadRequest("model is required")
    trace(request)["model"] = body.model
    if not body.prompt:
        return {"embedding": []}
    out = await _service(request).embed(body.model, [body.prompt], keep_alive=translate.keep_alive(body.keep_alive),
                                        options=check(body.options))
    return {"embedding": out.vectors[0]}


# -- model management -----------------------------------------------------------------

@router.get("/api/tags")
@router.head("/api/tags", include_in_schema=False)
async def tags(request: Request) -> dict[str, Any]:
    return {"models": remote.listing(_service(request), translate.tag_entry, native=True)}


@router.post("/api/show")
async def show(request: Request, body: ModelRequest) -> dict[str, Any]:
    if not body.target:
        raise BadRequest("model is required")
    service = _service(request)
    if remote.serves(service, body.target):
        return await remote.show(service, body.target, verbose=bool(body.verbose))
    m = service.store.get(body.target)
    out = translate.show(m, verbose=bool(body.verbose))
    runner = service.scheduler.runners.get(ModelName.parse(body.target).display.lower())
    if runner is not None and runner.info.details.get("fallbacks"):
        out.setdefault("kiln", {})["runtime"] = runner.info.public()
    # model_info has the trained context (<arch>.context_length, what `ollama show` prints);
    # kiln adds the context a request gets by default: the loaded one, or what a load would give.
    ctx, why = service.scheduler.context_for(m, None)
    kiln = out.setdefault("kiln", {})
    kiln["context_length"] = runner.num_ctx if runner is not None else ctx
    if why and runner is None:
        kiln["context_limited_by"] = why
    # what that context costs, before any load: the KV cache the memory budget counts
    kiln["kv_cache"] = service.scheduler.kv_cache_plan(m, kiln["context_length"],
                                                       runner.num_parallel if runner is not None else None)
    return out


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    out = []
    for r in _service(request).scheduler.loaded():
        entry = {"name": r.manifest.name, "model": r.manifest.name, "size": r.size, "digest": r.manifest.digest,
                 "details": translate.details(r.manifest), "expires_at": r.expires_at_rfc3339,
                 "size_vram": 0, "context_length": r.num_ctx}
        # kiln's own fields (clients ignore unknown keys): device, fallbacks, requests in flight
        entry["kiln"] = {**r.info.public(), "backend": r.manifest.backend, "requests": r.refcount,
                         "num_parallel": r.num_parallel}
        out.append(entry)
    return {"models": out + await remote.ps_entries(_service(request))}


@router.post("/api/copy")
async def copy(request: Request, body: CopyRequest) -> Response:
    if not body.source or not body.destination:
        raise BadRequest("source and destination are required")
    service = _service(request)
    if remote.serves(service, body.source):
        await remote.copy(service, body.source, body.destination)
        return Response(status_code=200)
    service.store.copy(body.source, body.destination)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(request: Request, body: ModelRequest) -> Response:
    if not body.target:
        raise BadRequest("model is required")
    service = _service(request)
    if remote.serves(service, body.target):
        await remote.delete(service, body.target)
        return Response(status_code=200)
    manifest = service.store.get(body.target)
    await service.scheduler.unload(manifest.name)
    service.store.delete(body.target)
    return Response(status_code=200)


async def _status_stream(request: Request, statuses: AsyncIterator[dict[str, Any]], stream: bool) -> Response:
    """Create and pull: NDJSON statuses, or the last one when not streaming. An error
    before the first status keeps its HTTP status."""
    try:
        first = await statuses.__anext__()
    except StopAsyncIteration:
        first = {"status": "success"}
    if not stream:
        last = first
        async for last in statuses:
            pass
        return JSONResponse(last)

    async def chain() -> AsyncIterator[dict[str, Any]]:
        yield first
        async for s in statuses:
            yield s

    return stream_response(guarded(chain(), ndjson_line, lambda msg: ndjson_line({"error": msg})), NDJSON)


@router.post("/api/create")
async def create(request: Request, body: CreateRequest) -> Response:
    service = _service(request)
    statuses = models.create(service.store, translate.create_request(body), service.renderer)
    return await _status_stream(request, statuses, body.stream is not False)


@router.post("/api/pull")
async def pull(request: Request, body: ModelRequest) -> Response:
    if not body.target:
        raise BadRequest("model is required")
    statuses = models.pull(_service(request).store, body.target, insecure=bool(body.insecure))
    return await _status_stream(request, statuses, body.stream is not False)


@router.post("/api/push")
async def push(body: ModelRequest) -> Response:
    raise BadRequest("push is not supported: kiln does not publish models to a registry")


@router.head("/api/blobs/{digest}")
async def blob_exists(request: Request, digest: str) -> Response:
    return Response(status_code=200 if _service(request).store.has_blob(digest) else 404)


@router.post("/api/blobs/{digest}", status_code=201)
async def blob_upload(request: Request, digest: str) -> Response:
    store = _service(request).store
    if store.has_blob(digest):
        return Response(status_code=200)
    try:
        with store.blob_writer(digest) as w:
            async for block in request.stream():
                await asyncio.to_thread(w.write, block) if len(block) > 1 << 20 else w.write(block)
    except ValueError as e:
        raise BadRequest(f"{e} for blob {digest}") from None
    return Response(status_code=201)
