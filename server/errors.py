"""Typed errors, and the one place that turns them into each dialect's status and body."""

from __future__ import annotations

from typing import Any

from backends.base import BackendError, InvalidRequest
from backends.store import InvalidName, ModelNotFound


class KilnError(Exception):
    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(KilnError):
    status = 400


class NotFound(KilnError):
    status = 404


class Unauthorized(KilnError):
    status = 401


class PayloadTooLarge(KilnError):
    status = 413


class ServerBusy(KilnError):
    """The model's queue is full (Ollama: ErrMaxQueue)."""

    status = 503

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__("server busy, please try again.  maximum pending requests exceeded",
                         headers={"Retry-After": str(retry_after)})


class Unavailable(KilnError):
    status = 503


def classify(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """(status, message, headers) for any exception the handlers may raise."""
    if isinstance(exc, KilnError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, ModelNotFound):
        return 404, str(exc), {}
    if isinstance(exc, InvalidName | InvalidRequest):
        return 400, str(exc), {}
    if isinstance(exc, BackendError):
        return 500, str(exc), {}
    return 500, f"internal error: {type(exc).__name__}", {}


def ollama_body(message: str) -> dict[str, Any]:
    return {"error": message}


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
                 503: "api_error"}


def openai_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"),
                      "param": None, "code": None}}
