"""The FastAPI application: ``create_app(settings)`` builds everything; state lives on
``app.state``, made in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from server import __version__, models
from backends.base import BackendError, InvalidRequest
from backends.store import InvalidName, ModelNotFound, ModelStore
from server.errors import KilnError, classify
from server.inference import Service
from server.metrics import Metrics
from server.middleware import Gatekeeper
from server.ollama.routes import router as ollama_router
from server.openai.routes import router as openai_router
from server.ops import Lifecycle
from server.ops import router as ops_router
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
            log.error("%s %s failed: %s", request.method, request.url.path, message,
                      exc_info=None if getattr(exc, "expected", False) else exc)
        return _error(request, status, message, headers, exc)

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


def check_exposure(settings: Settings) -> None:
    """Keyless Ollama servers on public addresses number in the hundreds of thousands;
    kiln refuses to become one."""
    if not settings.is_loopback and not settings.keys and not settings.insecure_no_auth:
        host = settings.bind[0]
        raise ValueError(f"refusing to listen on {host} without an API key: set KILN_API_KEY (clients then send "
                         f"Authorization: Bearer <key>), or KILN_INSECURE_NO_AUTH=1 if a proxy in front "
                         f"authenticates")


def create_app(settings: Settings | None = None, backend_factory: BackendFactory | None = None) -> FastAPI:
    settings = settings or Settings()
    check_exposure(settings)
    metrics = Metrics()
    lifecycle = Lifecycle(settings.shutdown_grace)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = ModelStore(settings.models)
        for name in models.seed_bundled(store):
            log.info("registered bundled model %s", name)
        scheduler = Scheduler(settings, store, backend_factory)
        scheduler.on_event = lambda event, runner, seconds: metrics.on_model(event, runner.manifest.name, seconds)
        app.state.settings = settings
        app.state.store = store
        app.state.scheduler = scheduler
        app.state.service = Service(settings, store, scheduler, metrics)
        app.state.ready = True
        lifecycle.loop = asyncio.get_running_loop()
        lifecycle.on_drain.append(lambda: setattr(app.state.service, "draining", True))
        try:
            yield
        finally:
            await scheduler.shutdown()

    app = FastAPI(title="kiln", version=__version__.VERSION, lifespan=lifespan,
                  description="Ollama- and OpenAI-compatible local inference server.")
    app.state.lifecycle = lifecycle
    app.include_router(ollama_router)
    app.include_router(openai_router)
    app.include_router(ops_router)
    _install_error_handlers(app)
    app.add_middleware(Gatekeeper, api_keys=settings.keys, max_body=settings.max_body_bytes,
                       metrics=metrics, log_format=settings.log_format)
    app.add_middleware(
        CORSMiddleware, allow_origin_regex=cors_origin_regex(settings.origins), allow_credentials=False,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "X-Kiln-Num-Ctx",
                       "OpenAI-Beta", "x-stainless-arch", "x-stainless-async", "x-stainless-custom-poll-interval",
                       "x-stainless-helper-method", "x-stainless-lang", "x-stainless-os",
                       "x-stainless-package-version", "x-stainless-poll-helper", "x-stainless-retry-count",
                       "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-timeout"],
    )
    return app
