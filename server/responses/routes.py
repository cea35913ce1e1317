"""OpenAI's Responses API, ``POST /v1/responses``: a thin handler over the same service
as every other dialect. Errors are OpenAI's shape (the path is under ``/v1``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from backends.base import Chunk
from server.inference import Result, Service
from server.openai.translate import NUM_CTX_HEADER
from server.responses import translate
from server.responses.protocol import ResponsesRequest
from server.routing import JSONBodyRoute, trace
from server.streaming import SSE, respond, sse_named

router = APIRouter(prefix="/v1", route_class=JSONBodyRoute)


def _events(pairs: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(sse_named(name, data) for name, data in pairs)


@router.post("/responses")
async def responses(request: Request, body: ResponsesRequest) -> Response:
    inf = translate.to_internal(body, request.headers.get(NUM_CTX_HEADER))
    inf.trace = trace(request)
    inf.stream = bool(body.stream)
    b = translate.ResponseBuilder(body)
    started = False

    def encode(item: Any) -> bytes | None:
        nonlocal started
        out = b""
        if not started:
            started = True
            out += _events(b.start())
        if isinstance(item, Chunk):
            out += _events(b.content(item))
        elif isinstance(item, Result):
            out += _events(b.finish(item))
        return out or None

    service: Service = request.app.state.service
    return await respond(request, service.stream(inf), stream=bool(body.stream), media_type=SSE, encode=encode,
                         on_error=lambda msg: _events(b.failed(msg, started)), whole=b.whole)
