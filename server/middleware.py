"""The ASGI layer in front of every route: request ids, the Host and Origin checks,
API keys and their scopes, the body size limit, one log line per request, and request
metrics.

Pure ASGI on purpose: Starlette's BaseHTTPMiddleware runs the app in another task
and breaks disconnect detection of streaming responses. It sits outside the CORS
middleware so that a request from a page that may not use the API is refused before
anything, a preflight included, answers it.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.store import ModelNotFound
from server.errors import dialect_body
from server.metrics import Metrics
from server.perimeter import HostPolicy, OriginPolicy

access_log = logging.getLogger("kiln.access")

# Liveness and the banner stay open so health checks need no key.
OPEN_PATHS = {"/", "/health", "/healthz", "/ready"}
# Model uploads are large by nature; everything else is JSON.
UNLIMITED_PREFIXES = ("/api/blobs/",)
# Routes that change the store: with keys configured, only an admin key opens them.
ADMIN_PATHS = {"/api/create", "/api/copy", "/api/delete", "/api/pull", "/api/push"}
ADMIN_PREFIXES = ("/api/blobs/",)
# A client's X-Request-Id is echoed and logged; anything else gets a fresh one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}")
# Headers that must come once: with two, proxies and servers disagree on which one
# counts, and that disagreement is how a check gets bypassed.
_SINGLE = (b"authorization", b"x-api-key", b"host", b"origin")
# What may not reach a log line raw: C0 and C1 controls (CR, LF, ESC for ANSI), DEL,
# Unicode line separators and the bidirectional overrides that reorder a terminal line.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_controls(s: str) -> str:
    """Each control character as ``\\xNN`` or ``\\uNNNN``."""
    return CONTROL_CHARS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", s)


def log_safe(value: Any) -> str:
    """``value`` as text with no control character left, and a backslash doubled so
    an escape cannot be forged either."""
    return escape_controls(str(value).replace("\\", "\\\\"))


def _text_field(value: Any) -> str:
    s = log_safe(value)
    if not s or any(c in s for c in ' "='):  # one field must not read as two
        return '"' + s.replace('"', '\\"') + '"'
    return s


def _templates(routes: list[Any], prefix: str = "") -> list[str]:
    """Every route's path template. FastAPI 0.120+ keeps an included router as one
    entry holding the original router; older versions list its routes flat."""
    out: list[str] = []
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            context = getattr(r, "include_context", None)
            out += _templates(inner.routes, prefix + (getattr(context, "prefix", "") or ""))
        elif isinstance(getattr(r, "path", None), str):
            out.append(prefix + r.path)
    return out


class Gatekeeper:
    def __init__(self, app: ASGIApp, *, api_keys: list[str], max_body: int, metrics: Metrics,
                 log_format: str = "text", admin_keys: list[str] | None = None,
                 hosts: HostPolicy | None = None, origins: OriginPolicy | None = None,
                 router: Any = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.admin_keys = [k.encode() for k in admin_keys or [] if k]
        self.max_body = max_body
        self.metrics = metrics
        self.json_logs = log_format == "json"
        self.hosts = hosts
        self.origins = origins
        self.router = router
        self.templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        path: str = scope.get("path", "")
        headers: dict[bytes, bytes] = {}
        repeated: list[bytes] = []
        for k, v in scope.get("headers") or []:
            if k in headers and k in _SINGLE:
                repeated.append(k)
            headers[k] = v
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.fullmatch(rid):
            rid = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        origin = headers.get(b"origin", b"").decode("latin-1")
        status = 0
        rejected = False
        seen = 0

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
                        await self._reject(scope, send_wrapped, 413, self._too_large(), origin=origin)
                    rejected = True
                    return {"type": "http.disconnect"}  # the app stops reading
            return message

        try:
            refusal = self._refusal(scope, path, headers, repeated, origin)
            if refusal is not None:
                code, message, extra, readable = refusal
                state["error"] = message
                await self._reject(scope, send_wrapped, code, message, extra, origin=origin if readable else "")
                return
            limited = self.max_body and not path.startswith(UNLIMITED_PREFIXES)
            if limited:
                length = headers.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > self.max_body:
                    await self._reject(scope, send_wrapped, 413, self._too_large(), origin=origin)
                    return
            await self.app(scope, limited_receive if limited else receive, send_wrapped)
        finally:
            self._record(scope, path, status, time.monotonic() - t0, state)

    # -- the checks, in order: the request's shape, Host, Origin, then its key --------
    def _refusal(self, scope: Scope, path: str, headers: dict[bytes, bytes], repeated: list[bytes],
                 origin: str) -> tuple[int, str, dict[str, str] | None, bool] | None:
        """``(status, message, headers, readable)`` for a request refused here, where
        ``readable`` says whether its page may read the refusal; None lets it in."""
        if repeated:
            name = repeated[0].decode().title()
            # 400, not 401: the request is malformed (RFC 9110 lets only list-valued
            # fields repeat), and a 401 would invite a retry with the same two headers.
            return 400, f"bad request: more than one {name} header; send it once", None, False
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and not self.hosts.allows(host):
            return 403, (f"forbidden: this server does not answer to the host '{log_safe(host[:100])}' "
                         f"(a DNS rebinding guard); add it to KILN_ALLOWED_HOSTS to allow it"), None, False
        if origin and self.origins is not None and not self.origins.allows(origin, host):
            return 403, (f"forbidden: requests from the web origin '{log_safe(origin[:100])}' are not allowed; "
                         f"add it to KILN_ORIGINS (OLLAMA_ORIGINS) to allow it"), None, False
        if not (self.keys or self.admin_keys) or path in OPEN_PATHS or scope.get("method") == "OPTIONS":
            return None
        scope_needed = "admin" if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES) else "inference"
        tokens = [t for t in self._tokens(headers) if t]
        if len(set(tokens)) > 1:
            return 400, "bad request: Authorization and x-api-key carry different keys; send one", None, True
        token = tokens[0] if tokens else b""
        is_admin = bool(token) and self._matches(token, self.admin_keys)
        if is_admin or (scope_needed == "inference" and token and self._matches(token, self.keys)):
            return None
        if scope_needed == "admin" and token and self._matches(token, self.keys):
            return 403, (f"forbidden: {path} changes the model store and needs an admin key (KILN_ADMIN_KEYS); "
                         f"this key may only run models"), None, True
        return 401, ("unauthorized: this server needs an API key (Authorization: Bearer <key>, or "
                     "x-api-key: <key>)"), {"www-authenticate": "Bearer"}, True

    @staticmethod
    def _tokens(headers: dict[bytes, bytes]) -> list[bytes]:
        """The keys the request offers: a Bearer token, an x-api-key (Anthropic's
        clients send that one). Any other Authorization scheme offers no key."""
        out: list[bytes] = []
        auth = headers.get(b"authorization")
        if auth is not None:
            scheme, _, token = auth.partition(b" ")
            out.append(token.strip() if scheme.lower() == b"bearer" and token.strip() else b"")
        api_key = headers.get(b"x-api-key")
        if api_key is not None:
            out.append(api_key.strip())
        return out

    @staticmethod
    def _matches(token: bytes, keys: list[bytes]) -> bool:
        ok = False
        for key in keys:  # compare with every key: no early exit to time
            ok |= hmac.compare_digest(token, key)
        return ok

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body} bytes (KILN_MAX_BODY_BYTES)"

    async def _reject(self, scope: Scope, send: Send, status: int, message: str,
                      extra: dict[str, str] | None = None, *, origin: str = "") -> None:
        path = scope.get("path", "")
        data = json.dumps(dialect_body(None, status, message, path=path)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        if origin:  # an allowed page may read why it was refused (the CORS layer is inside)
            headers += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    # -- the record of the request: metrics and one access-log line ----------------------
    def _endpoint(self, scope: Scope) -> str:
        """A bounded label: the route's template (``/api/blobs/{digest}``), ``other``
        for a path no route has."""
        route = scope.get("route")  # set by routing
        if route is not None and getattr(route, "path", None):
            return route.path
        if self.templates is None:  # refused before routing: match the path ourselves
            self.templates = [(compile_path(t)[0], t) for t in _templates(getattr(self.router, "routes", []))]
        path = scope.get("path", "")
        return next((t for regex, t in self.templates if regex.match(path)), "other")

    @staticmethod
    def _model_label(scope: Scope, raw: Any) -> str:
        """The stored model's name, ``other`` for a name the store does not have: a
        label a client can choose makes series without bound."""
        if not raw:
            return ""
        store = getattr(getattr(scope.get("app"), "state", None), "store", None)
        if store is None:
            return "other"
        try:
            return store.get(str(raw)).name
        except (ModelNotFound, ValueError, OSError, TypeError, KeyError):
            return "other"  # InvalidName is a ValueError

    def _record(self, scope: Scope, path: str, status: int, seconds: float, state: dict[str, Any]) -> None:
        endpoint = self._endpoint(scope)
        model = state.get("model", "")
        self.metrics.requests.labels(endpoint, self._model_label(scope, model), str(status)).inc()
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
            # ensure_ascii escapes every character outside printable ASCII, controls included
            access_log.info(json.dumps(fields, separators=(",", ":"), ensure_ascii=True, default=str))
        else:
            access_log.info(" ".join(f"{k}={_text_field(v)}" for k, v in fields.items()))
