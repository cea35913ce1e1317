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
from server.streaming import SSE, Opening, respond, sse_events

router = APIRouter(prefix="/v1", route_class=JSONBodyRoute)


@router.post("/responses")
async def responses(request: Request, body: ResponsesRequest) -> Response:
    inf = translate.to_internal(body, request.headers.get(NUM_CTX_HEADER))
    inf.trace = trace(request)
    inf.stream = bool(body.stream)
    b = translate.ResponseBuilder(body)

    def each(item: Any) -> bytes:
        if isinstance(item, Chunk):
            return sse_events(b.content(item))
        if isinstance(item, Result):
            return sse_events(b.finish(item))
        return b""

    encode = Opening(lambda: sse_events(b.start()), each)
    service: Service = request.app.state.service
    return await respond(request, service.stream(inf), stream=bool(body.stream), media_type=SSE, encode=encode,
                         on_error=lambda msg: sse_events(b.failed(msg, encode.started)), whole=b.whole)
