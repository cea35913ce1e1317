"""Wire framing for streams: NDJSON (Ollama) and SSE (OpenAI), in-stream errors, and
the one response helper both dialects use.

Once the status line is sent, an error can only travel inside the stream: an
``{"error": ...}`` line for NDJSON, an error event followed by ``[DONE]`` for SSE.
A client that goes away cancels the body iterator at once (Starlette listens for
``http.disconnect`` while it streams), which closes the engine's stream and frees
the slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from backends.base import Chunk
from server.errors import classify
from server.inference import Ready, Result

log = logging.getLogger("kiln.streaming")

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# orjson, not json: its output is the same compact UTF-8, and it is one C call per
# event where json.dumps with options runs a Python encoder object (per token).
def ndjson_line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def sse_event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_named(event: str, obj: Any) -> bytes:
    """An SSE event with an ``event:`` line: Anthropic's and the Responses API's
    clients dispatch on it."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def sse_events(pairs: list[tuple[str, dict[str, Any]]]) -> bytes:
    """Named events in order (Anthropic's and the Responses API's builders give pairs)."""
    return b"".join(sse_named(name, data) for name, data in pairs)


class Opening:
    """A stream's ``encode`` for ``guarded``: the bytes of ``start()`` go before the
    first item's (the opening events are sent once the request holds a slot, with
    whatever the first item brings); ``started`` says whether they went out."""

    def __init__(self, start: Callable[[], bytes], each: Callable[[Any], bytes]) -> None:
        self.start, self.each, self.started = start, each, False

    def __call__(self, item: Any) -> bytes | None:
        out = b""
        if not self.started:
            self.started = True
            out += self.start()
        out += self.each(item)
        return out or None


def shutdown_event(request: Request) -> asyncio.Event | None:
    lifecycle = getattr(request.app.state, "lifecycle", None)
    return lifecycle.stop if lifecycle is not None else None


def stream_response(body: AsyncIterator[bytes], media_type: str,
                    headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type=media_type, headers={**_STREAM_HEADERS, **(headers or {})})


async def guarded(items: AsyncIterator[Any], encode: Callable[[Any], bytes | None],
                  on_error: Callable[[str], bytes], stop: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """Encodes items; an exception after the first byte becomes an in-stream error, and
    so does a shutdown whose grace period ran out (``stop``)."""
    try:
        async for item in items:
            if stop is not None and stop.is_set():
                yield on_error("the server is shutting down; the stream was ended")
                return
            data = encode(item)
            if data:
                yield data
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the client inside the stream
        _, message, _ = classify(e)
        log.warning("stream ended with an error: %s", message)
        yield on_error(message)
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


async def with_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Runs a non-streaming handler's work, cancelling it if the client hangs up
    (vLLM's ``with_cancellation``: polling ``is_disconnected`` misses it under load)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001
        pass
    return JSONResponse({"error": "client disconnected"}, status_code=499)


async def respond(request: Request, items: AsyncGenerator[Any, None], *, stream: bool, media_type: str,
                  encode: Callable[[Any], bytes | None], on_error: Callable[[str], bytes],
                  whole: Callable[[str, Result], dict[str, Any]]) -> Response:
    """The response for a primed generation: ``items`` yields ``Ready`` first (once
    the request holds a slot, so errors until then keep their status code), then
    ``Chunk``s and a ``Result``. Streams with ``encode``, or answers one JSON body
    built by ``whole(text, result)``."""
    first = await with_disconnect(request, items.__anext__())
    if not isinstance(first, Ready):
        return first  # the client went away while waiting
    if stream:
        return stream_response(guarded(items, encode, on_error, shutdown_event(request)), media_type,
                               first.headers())

    async def collect() -> tuple[str, Any]:
        parts: list[str] = []
        async for item in items:
            if isinstance(item, Chunk):
                parts.append(item.text)
            else:
                return "".join(parts), item
        raise RuntimeError("generation ended without a result")

    try:
        out = await with_disconnect(request, collect())
    finally:
        await items.aclose()
    if isinstance(out, Response):
        return out
    text, result = out
    return JSONResponse(whole(text, result), headers={**first.headers(), **result.headers()})
