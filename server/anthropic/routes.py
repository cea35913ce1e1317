"""Anthropic's Messages API: ``/v1/messages`` and ``/v1/messages/count_tokens``, thin
handlers over the same service as ``/api`` and the OpenAI routes. Errors on these paths
are in Anthropic's shape (server/errors.py ``dialect``), before and inside the stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request, Response

from backends.base import Chunk
from server.anthropic import translate
from server.anthropic.protocol import CountTokensRequest, MessagesRequest
from server.inference import Inference, Ready, Result, Service
from server.routing import JSONBodyRoute, trace
from server.streaming import SSE, Opening, respond, sse_events, with_disconnect

router = APIRouter(prefix="/v1", route_class=JSONBodyRoute)


def _service(request: Request) -> Service:
    return request.app.state.service


async def _noting_ready(items: AsyncGenerator[Any, None], seen: list[Ready]) -> AsyncGenerator[Any, None]:
    """Passes the items on, keeping the ``Ready`` (its prompt count opens the stream)."""
    async with contextlib.aclosing(items):
        async for item in items:
            if isinstance(item, Ready):
                seen.append(item)
            yield item


@router.post("/messages")
async def messages(request: Request, body: MessagesRequest) -> Response:
    inf = translate.to_internal(body)
    inf.trace = trace(request)
    inf.stream = bool(body.stream)
    s = translate.MessageStream(body.model, body.stop_sequences)
    ready: list[Ready] = []

    def each(item: Any) -> bytes:
        if isinstance(item, Chunk):
            return sse_events(s.content(item))
        if isinstance(item, Result):
            return sse_events(s.finish(item))
        return b""

    encode = Opening(lambda: sse_events(s.start(ready[0].prompt_tokens if ready else 0)), each)
    return await respond(request, _noting_ready(_service(request).stream(inf), ready), stream=bool(body.stream),
                         media_type=SSE, encode=encode,
                         on_error=lambda msg: sse_events([translate.stream_error(500, msg)]),
                         whole=lambda text, r: translate.message(s.id, body.model, text, r, body.stop_sequences))


@router.post("/messages/count_tokens")
async def count_tokens(request: Request, body: CountTokensRequest) -> Any:
    inf: Inference = translate.to_internal(body)
    inf.trace = trace(request)
    n = await with_disconnect(request, _service(request).count_tokens(inf))
    return n if isinstance(n, Response) else {"input_tokens": n}
