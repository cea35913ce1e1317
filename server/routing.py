"""Request plumbing shared by both dialects: JSON bodies whatever their content type
says (as Ollama reads them), and errors in the dialect of the path."""

from __future__ import annotations

import email.message
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from server.errors import dialect_body

# Content types a JSON body may come with. curl -d sends form-urlencoded, litellm's
# ollama/ and ollama_chat/ providers (and aider, smolagents through them) send no
# Content-Type at all, and Ollama reads the body as JSON whatever the header says;
# anything else is refused (415).
_JSON_OK = {"application/json", "application/x-www-form-urlencoded", "text/plain"}


class JSONBodyRoute(APIRoute):
    """Reads every body as JSON, like Ollama's gin binding, unless its content type
    says it is something else entirely."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            ctype = request.headers.get("content-type")
            if self.body_field is not None:
                kind = ""  # no header: read as JSON (FastAPI would hand the model raw bytes)
                if ctype:
                    msg = email.message.Message()
                    msg["content-type"] = ctype
                    kind = msg.get_content_type()
                    if kind not in _JSON_OK and not kind.endswith("+json"):
                        return error_response(request, 415, f"unsupported content type {kind!r}: send the body as "
                                                    "JSON (Content-Type: application/json)")
                if kind != "application/json":
                    headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                    request.scope["headers"] = headers + [(b"content-type", b"application/json")]
                    request = Request(request.scope, request.receive)
            return await handler(request)

        return route


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None,
                   exc: BaseException | None = None) -> JSONResponse:
    body = dialect_body(exc, status, message, path=request.url.path)
    return JSONResponse(body, status_code=status, headers=headers)




def trace(request: Request) -> dict[str, Any]:
    """The per-request annotations the access log and metrics read (see middleware.py)."""
    return request.scope.setdefault("state", {})
