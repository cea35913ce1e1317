"""OpenAI's API under ``/v1``: thin handlers over the same service as ``/api``."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request, Response

from backends.base import Chunk
from server import remote
from server.errors import BadRequest
from server.inference import Result, Service
from server.openai import translate
from server.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from server.routing import JSONBodyRoute, trace
from server.streaming import SSE, SSE_DONE, Opening, respond, sse_event

router = APIRouter(prefix="/v1", route_class=JSONBodyRoute)


def _service(request: Request) -> Service:
    return request.app.state.service


def _sse_error(message: str) -> bytes:
    from server.errors import openai_body

    return sse_event(openai_body(500, message)) + SSE_DONE


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    inf = translate.chat_to_internal(body, request.headers.get(translate.NUM_CTX_HEADER))
    inf.trace = trace(request)
    inf.stream = bool(body.stream)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    s = translate.ChatStream(body.model, include_usage)

    def each(item: Any) -> bytes:
        if isinstance(item, Chunk) and (item.text or item.thinking):
            return sse_event(s.content(item))
        if isinstance(item, Result):
            return b"".join(sse_event(c) for c in s.finish(item)) + SSE_DONE
        return b""

    encode = Opening(lambda: b"".join(sse_event(s.role(i)) for i in range(inf.n)), each)
    return await respond(request, _service(request).stream(inf), stream=bool(body.stream), media_type=SSE,
                         encode=encode, on_error=_sse_error,
                         whole=lambda text, r: translate.chat_completion(s.id, body.model, text, r))


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    infs = translate.completion_to_internal(body, request.headers.get(translate.NUM_CTX_HEADER))
    for inf in infs:
        inf.trace = trace(request)
        inf.stream = bool(body.stream)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    s = translate.CompletionStream(body.model, include_usage)
    n = infs[0].n
    # each choice's prompt first, as written (cheap: no logprobs)
    echo = [inf.prompt or "" for inf in infs for _ in range(n)] if body.echo else []

    def each(item: Any) -> bytes:
        if isinstance(item, Chunk) and item.text:
            return sse_event(s.content(item))
        if isinstance(item, Result):
            return b"".join(sse_event(c) for c in s.finish(item)) + SSE_DONE
        return b""

    encode = Opening(lambda: b"".join(sse_event(s.content(Chunk(text=e, index=i))) for i, e in enumerate(echo)
                                      if e), each)
    service = _service(request)
    items = service.stream(infs[0]) if len(infs) == 1 else service.stream_several(infs)
    return await respond(request, items, stream=bool(body.stream), media_type=SSE,
                         encode=encode, on_error=_sse_error,
                         whole=lambda text, r: translate.completion(s.id, body.model, text, r, echo))


@router.post("/embeddings")
async def embeddings(request: Request, body: EmbeddingRequest) -> dict[str, Any]:
    if not body.model:
        raise BadRequest("you must provide a model parameter")
    encoding = body.encoding_format or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be 'float' or 'base64', got {encoding!r}")
    if body.dimensions is not None and body.dimensions <= 0:
        raise BadRequest("dimensions must be a positive integer")
    trace(request)["model"] = body.model
    texts = translate.embedding_input(body.input)
    if not texts or any(not t for t in texts):
        raise BadRequest("input must not be empty")
    out = await _service(request).embed(body.model, texts)
    data = []
    for i, v in enumerate(out.vectors):
        v = v[: body.dimensions] if body.dimensions else v
        n = math.sqrt(sum(x * x for x in v)) or 1.0
        data.append({"object": "embedding", "embedding": translate.encode_embedding([x / n for x in v], encoding),
                     "index": i})
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": remote.listing(_service(request), translate.model_entry)}


@router.get("/models/{model:path}")
async def get_model(request: Request, model: str) -> dict[str, Any]:
    m = remote.get(_service(request), model)
    return {**translate.model_entry(m), "id": model}
