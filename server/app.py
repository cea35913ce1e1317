"""The FastAPI application: ``create_app(settings)`` builds everything; state lives on
``app.state``, made in the lifespan."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from server import __version__, models
from backends.base import BackendError, InvalidRequest
from backends.store import InvalidName, ModelNotFound, ModelStore
from server.errors import KilnError, classify
from server.inference import Service
from server.ollama.routes import router as ollama_router
from server.openai.routes import router as openai_router
from server.scheduler import BackendFactory, Scheduler
from server.routing import error_response as _error
from server.settings import Settings

log = logging.getLogger("kiln")

def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"invalid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}"
        if e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",):
            return "missing request body"
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request, 400, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "invalid JSON: the body could not be parsed (too deeply nested or not UTF-8)"
        return _error(request, exc.status_code, message, getattr(exc, "headers", None))

    async def _typed(request: Request, exc: Exception) -> JSONResponse:
        status, message, headers = classify(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, message, exc_info=exc)
        return _error(request, status, message, headers)

    # Known errors get their status here; anything else reaches Starlette's
    # ServerErrorMiddleware through the Exception handler (a 500, logged).
    for exc_type in (KilnError, ModelNotFound, InvalidName, InvalidRequest, BackendError, Exception):
        app.add_exception_handler(exc_type, _typed)


def cors_origin_regex(extra: list[str]) -> str:
    """OLLAMA_ORIGINS semantics: localhost-like origins on any port, app/file/tauri/
    vscode-webview schemes, plus the configured ones (``*`` is a wildcard)."""
    base = [r"https?://(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(:\d+)?", r"app://.*", r"file://.*",
            r"tauri://.*", r"vscode-webview://.*", r"vscode-file://.*"]
    base += [".*".join(re.escape(p) for p in o.split("*")) for o in extra]
    return "^(" + "|".join(base) + ")$"


def create_app(settings: Settings | None = None, backend_factory: BackendFactory | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = ModelStore(settings.models)
        for name in models.seed_bundled(store):
            log.info("registered bundled model %s", name)
        scheduler = Scheduler(settings, store, backend_factory)
        app.state.settings = settings
        app.state.store = store
        app.state.scheduler = scheduler
        app.state.service = Service(settings, store, scheduler)
        try:
            yield
        finally:
            await scheduler.shutdown()

    app = FastAPI(title="kiln", version=__version__.VERSION, lifespan=lifespan,
                  description="Ollama- and OpenAI-compatible local inference server.")
    app.include_router(ollama_router)
    app.include_router(openai_router)
    _install_error_handlers(app)
    app.add_middleware(
        CORSMiddleware, allow_origin_regex=cors_origin_regex(settings.origins), allow_credentials=False,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With",
                       "OpenAI-Beta", "x-stainless-arch", "x-stainless-async", "x-stainless-custom-poll-interval",
                       "x-stainless-helper-method", "x-stainless-lang", "x-stainless-os",
                       "x-stainless-package-version", "x-stainless-poll-helper", "x-stainless-retry-count",
                       "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-timeout"],
    )
    return app
