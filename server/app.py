"""The FastAPI application: ``create_app(settings)`` builds everything; state lives on
``app.state``, made in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from server import __version__, models
from backends.base import BackendError, InvalidRequest
from backends.store import InvalidName, ModelNotFound, ModelStore
from backends.upstream import UpstreamPool
from server.errors import KilnError, classify
from server.inference import Service
from server.metrics import Metrics
from server.middleware import Gatekeeper
from server.anthropic.routes import router as anthropic_router
from server.ollama.routes import router as ollama_router
from server.openai.routes import router as openai_router
from server.ops import Lifecycle
from server.responses.routes import router as responses_router
from server.ops import router as ops_router
from server.perimeter import HostPolicy, OriginPolicy, origin_regex
from server.scheduler import BackendFactory, Scheduler
from server.routing import error_response as _error
from server.routing import trace
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


def _failed(request: Request, status: int, message: str) -> str:
    """The message a failed request answers with: paths inside the model store made
    relative; a client error is noted for the request's one access-log line (at info),
    with no traceback of its own."""
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is not None:
        message = scheduler.scrub(message)
    if status < 500:
        trace(request)["error"] = message[:300]
    return message


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request, 400, _failed(request, 400, _validation_message(exc)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "invalid JSON: the body could not be parsed (too deeply nested or not UTF-8)"
        message = _failed(request, exc.status_code, message)
        return _error(request, exc.status_code, message, getattr(exc, "headers", None))

    known = (KilnError, ModelNotFound, InvalidName, InvalidRequest, BackendError)

    async def _typed(request: Request, exc: Exception) -> JSONResponse:
        status, message, headers = classify(exc)
        message = _failed(request, status, message)
        # A failure kiln knows (an engine's) is one line with its message. A bug is not
        # logged here: this handler answers from Starlette's outermost middleware, which
        # then re-raises, and the server logs that traceback (logging it here too printed
        # every traceback twice).
        if status >= 500 and isinstance(exc, known):
            log.error("%s %s failed: %s", request.method, request.url.path, message)
        return _error(request, status, message, headers, exc)

    for exc_type in (*known, Exception):
        app.add_exception_handler(exc_type, _typed)


def cors_origin_regex(extra: list[str]) -> str:
    """OLLAMA_ORIGINS semantics (see server/perimeter.py)."""
    return origin_regex(extra)


def host_policy(settings: Settings) -> HostPolicy | None:
    """The Host check (DNS rebinding) is on wherever a page could drive a server that
    asks for no key: on a loopback listener (as Ollama), on any listener without keys,
    and wherever KILN_ALLOWED_HOSTS names hosts. A keyed server beyond loopback is off by
    default: it is reached by names it cannot know (DNS aliases, a proxy's, the Docker
    host's), and a rebinding page has no key to send. ``*`` turns it off everywhere."""
    if "*" in settings.allowed_hosts:
        return None
    if settings.is_loopback or not settings.any_keys or settings.allowed_hosts:
        return HostPolicy(settings.allowed_hosts)
    return None


def check_exposure(settings: Settings) -> None:
    """Keyless Ollama servers on public addresses number in the hundreds of thousands;
    kiln refuses to become one."""
    if not settings.is_loopback and not settings.any_keys and not settings.insecure_no_auth:
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
        await asyncio.to_thread(store.prune)  # blobs left by deletes before this version, or a crash
        scheduler = Scheduler(settings, store, backend_factory)
        scheduler.on_event = lambda event, runner, seconds: metrics.on_model(event, runner.manifest.name, seconds)
        app.state.settings = settings
        app.state.store = store
        app.state.scheduler = scheduler
        app.state.service = Service(settings, store, scheduler, metrics)
        app.state.upstreams = None
        if settings.upstreams:  # backends/upstream.py; nothing of it runs without [[upstreams]]
            app.state.upstreams = app.state.service.upstreams = UpstreamPool(settings.upstreams)
            await app.state.upstreams.start()
        app.state.ready = True
        lifecycle.loop = asyncio.get_running_loop()
        lifecycle.on_drain.append(lambda: setattr(app.state.service, "draining", True))
        try:
            yield
        finally:
            if app.state.upstreams is not None:
                await app.state.upstreams.close()
            await scheduler.shutdown()
            await app.state.service.renderer.close()

    app = FastAPI(title="kiln", version=__version__.VERSION, lifespan=lifespan,
                  description="Ollama- and OpenAI-compatible local inference server.")
    app.state.lifecycle = lifecycle
    app.include_router(ollama_router)
    app.include_router(openai_router)
    app.include_router(anthropic_router)
    app.include_router(responses_router)
    app.include_router(ops_router)
    _install_error_handlers(app)
    app.add_middleware(
        CORSMiddleware, allow_origin_regex=cors_origin_regex(settings.origins), allow_credentials=False,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "X-Api-Key",
                       "X-Kiln-Num-Ctx", "anthropic-version", "anthropic-beta",
                       "OpenAI-Beta", "x-stainless-arch", "x-stainless-async", "x-stainless-custom-poll-interval",
                       "x-stainless-helper-method", "x-stainless-lang", "x-stainless-os",
                       "x-stainless-package-version", "x-stainless-poll-helper", "x-stainless-retry-count",
                       "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-timeout"],
    )
    # Added last, so outermost: the Host and Origin checks run before the CORS layer
    # could answer a preflight, and before any handler.
    app.add_middleware(Gatekeeper, api_keys=settings.keys, admin_keys=settings.admin_key_list,
                       max_body=settings.max_body_bytes, metrics=metrics, log_format=settings.log_format,
                       hosts=host_policy(settings), origins=OriginPolicy(settings.origins), router=app.router)
    return app
