"""The ASGI layer in front of every route: request ids, API keys, the body size
limit, one log line per request, and request metrics.

Pure ASGI on purpose: Starlette's BaseHTTPMiddleware runs the app in another task
and breaks disconnect detection of streaming responses.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ollama_body, openai_body
from server.metrics import Metrics

access_log = logging.getLogger("kiln.access")

# Liveness and the banner stay open so health checks need no key.
OPEN_PATHS = {"/", "/health", "/healthz", "/ready"}
# Model uploads are large by nature; everything else is JSON.
UNLIMITED_PREFIXES = ("/api/blobs/",)


def _endpoint(path: str) -> str:
    """A low-cardinality label: the route, not the ids inside it."""
    for prefix in ("/api/blobs/", "/v1/models/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    return path if len(path) < 64 else path[:64]


class Gatekeeper:
    def __init__(self, app: ASGIApp, *, api_keys: list[str], max_body: int, metrics: Metrics,
                 log_format: str = "text") -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.max_body = max_body
        self.metrics = metrics
        self.json_logs = log_format == "json"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        path: str = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 0
        rejected = False

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if rejected:
                return  # a 413 went out while the app was still reading
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body and not rejected:
                    if status == 0:
                        await self._reject(scope, send_wrapped, 413, self._too_large())
                    rejected = True
                    return {"type": "http.disconnect"}  # the app stops reading
            return message

        seen = 0
        try:
            if self.keys and path not in OPEN_PATHS and scope.get("method") != "OPTIONS":
                if not self._authorized(headers.get(b"authorization", b"")):
                    await self._reject(scope, send_wrapped, 401, "unauthorized: this server needs an API key "
                                       "(Authorization: Bearer <key>)", {"www-authenticate": "Bearer"})
                    return
            limited = self.max_body and not path.startswith(UNLIMITED_PREFIXES)
            if limited:
                length = headers.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > self.max_body:
                    await self._reject(scope, send_wrapped, 413, self._too_large())
                    return
            await self.app(scope, limited_receive if limited else receive, send_wrapped)
        finally:
            self._record(scope, path, status, time.monotonic() - t0, state)

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body} bytes (KILN_MAX_BODY_BYTES)"

    def _authorized(self, value: bytes) -> bool:
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        ok = False
        for key in self.keys:  # compare with every key: no early exit to time
            ok |= hmac.compare_digest(token.strip(), key)
        return ok

    async def _reject(self, scope: Scope, send: Send, status: int, message: str,
                      extra: dict[str, str] | None = None) -> None:
        path = scope.get("path", "")
        body = openai_body(status, message) if path.startswith("/v1") else ollama_body(message)
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def _record(self, scope: Scope, path: str, status: int, seconds: float, state: dict[str, Any]) -> None:
        endpoint = _endpoint(path)
        model = str(state.get("model", ""))
        self.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.metrics.request_seconds.labels(endpoint).observe(seconds)
        fields: dict[str, Any] = {"id": state.get("request_id"), "method": scope.get("method"), "path": path,
                                  "status": status, "ms": round(seconds * 1000, 1)}
        if model:
            fields["model"] = model
        for key in ("prompt_tokens", "completion_tokens", "cached_tokens", "ttft_ms", "done_reason", "error"):
            if key in state:
                fields[key] = state[key]
        client = scope.get("client")
        if client:
            fields["client"] = f"{client[0]}:{client[1]}"
        if self.json_logs:
            access_log.info(json.dumps(fields, separators=(",", ":")))
        else:
            access_log.info(" ".join(f"{k}={v}" for k, v in fields.items()))

