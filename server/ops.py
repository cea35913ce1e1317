"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(include_in_schema=False)
log = logging.getLogger("kiln")


class Lifecycle:
    """Graceful shutdown: on SIGTERM stop taking new generations, give running streams
    ``grace`` seconds to finish, then end the rest with an in-stream error."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self.stop = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_drain: list[Callable[[], None]] = []

    def begin_drain(self) -> None:
        """Safe to call from a signal handler."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        for fn in self.on_drain:
            fn()
        log.info("shutting down: running streams have %.0fs to finish", self.grace)
        assert self.loop is not None
        self.loop.call_later(self.grace, self.stop.set)


@router.get("/health")
@router.get("/healthz")
async def health(request: Request) -> JSONResponse:
    """The process answers: 200, or 503 once it drains for shutdown, so a router in front
    (SMG, vllm-router, a Kubernetes Service) stops sending it work; with [[upstreams]],
    their replicas' state too. Models load on demand, so there is no "loading" state here."""
    upstreams = getattr(request.app.state, "upstreams", None)
    draining = request.app.state.lifecycle.draining
    body: dict[str, Any] = {"status": "draining" if draining else "ok"}
    if upstreams is not None:
        body["upstreams"] = upstreams.status()
    return JSONResponse(body, status_code=503 if draining else 200)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: the store is open and the server is not draining for shutdown."""
    ok = getattr(request.app.state, "ready", False) and not request.app.state.lifecycle.draining
    return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    service = request.app.state.service
    scheduler = service.scheduler
    service.metrics.sample(scheduler.loaded(), dict(scheduler.waiting))
    if service.upstreams is not None:
        service.metrics.sample_upstreams(service.upstreams.status())
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
