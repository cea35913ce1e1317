"""Typed errors, and the one place that turns them into each dialect's status and body."""

from __future__ import annotations

from typing import Any

from backends.base import BackendError, EngineUnavailable, InvalidRequest
from backends.store import InvalidName, ModelNotFound


class KilnError(Exception):
    status = 500
    code: str | None = None  # OpenAI's error ``code`` (clients key on it)
    param: str | None = None  # OpenAI's error ``param``: the request field at fault
    expected = False  # a 5xx that is not kiln's fault (no registry reachable): logged without a traceback

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def openai_message(self) -> str:
        return self.message


class BadRequest(KilnError):
    status = 400


class NotFound(KilnError):
    status = 404


class ServerBusy(KilnError):
    """The model's queue is full (Ollama: ErrMaxQueue)."""

    status = 503

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__("server busy, please try again.  maximum pending requests exceeded",
                         headers={"Retry-After": str(retry_after)})


class Unavailable(KilnError):
    status = 503


class ContextOverflow(BadRequest):
    """A prompt longer than the context window. Worded so that clients recognise it:
    Ollama's own message first on /api (OpenClaw starts its context compaction on it),
    OpenAI's ``context_length_exceeded`` on /v1; then kiln's numbers and what to do."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, window: int, trained: int, *, asked: int | None = None,
                 param: str = "messages", why: str | None = None, exact: bool = True,
                 compiled: str | None = None) -> None:
        """``compiled``: the window is a compiled limit (the NPU's MAX_PROMPT_LEN), and this
        is the command that recompiles the model for the prompt, or "" if none can."""
        self.prompt_tokens, self.window, self.trained, self.asked = prompt_tokens, window, trained, asked
        self.param = param
        # A prompt whose size alone shows it cannot fit is not tokenized (server/inference.py
        # _count): its count is a lower bound.
        size = self.size = "" if exact else "at least "
        limit = "num_ctx" if compiled is None else "MAX_PROMPT_LEN, compiled for the NPU"
        self.numbers = (f"the prompt is {size}{prompt_tokens} tokens, the context window {window} tokens ({limit}), "
                        f"the model's trained maximum {trained} tokens")
        if compiled:
            self.advice = f"recompile the model for longer prompts ({compiled}) or shorten the {param}"
        elif compiled is not None:
            self.advice = f"no recompile can take this prompt within the trained maximum: shorten the {param}"
        elif asked and trained and asked > trained:
            self.advice = (f"the request asked for num_ctx {asked}, more than the model was trained for, so "
                           f"{window} is the most it gets: shorten the {param}")
        elif window < trained and why:
            self.advice = f"{why}: shorten the {param}"
        elif window < trained:
            self.advice = f"raise num_ctx (up to {trained}: {{how}}) or shorten the {param}"
        else:
            self.advice = f"the window is already the model's trained maximum: shorten the {param}"
        how = "options.num_ctx in the request, or KILN_CONTEXT_LENGTH/OLLAMA_CONTEXT_LENGTH for the server"
        super().__init__(f"the input length exceeds the context length: {self.numbers}; "
                         f"{self.advice.format(how=how)}"
                         + (" (or send truncate: true to drop the oldest turns)" if param == "messages" else ""))

    def openai_message(self) -> str:
        how = ("num_ctx in the body, top-level or in an options object, or the X-Kiln-Num-Ctx header; "
               "KILN_CONTEXT_LENGTH for the server")
        return (f"This model's maximum context length is {self.window} tokens. However, your {self.param} "
                f"resulted in {self.size}{self.prompt_tokens} tokens. Please reduce the length of the {self.param}. "
                f"({self.numbers}; {self.advice.format(how=how)})")


def classify(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """(status, message, headers) for any exception the handlers may raise."""
    if isinstance(exc, KilnError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, ModelNotFound):
        return 404, str(exc), {}
    if isinstance(exc, InvalidName | InvalidRequest):
        return 400, str(exc), {}
    if isinstance(exc, EngineUnavailable):
        return 503, str(exc), {}
    if isinstance(exc, BackendError):  # the engine failed: its own words
        return 500, str(exc), {}
    return 500, f"internal error: {type(exc).__name__}", {}


def ollama_body(message: str) -> dict[str, Any]:
    return {"error": message}


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
                 503: "api_error"}


def openai_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"),
                      "param": param, "code": code}}


# Anthropic's Messages API (/v1/messages) has its own error shape and types.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}


def anthropic_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def dialect(path: str) -> str:
    """The wire dialect a path speaks, for its errors: "anthropic", "openai" or "ollama"."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai" if path == "/v1" or path.startswith("/v1/") else "ollama"


def dialect_body(exc: BaseException | None, status: int, message: str, *, path: str) -> dict[str, Any]:
    """The error body in the dialect of ``path``; a ``KilnError`` may word itself for
    OpenAI clients and carry OpenAI's ``code`` and ``param``."""
    kind = dialect(path)
    if kind == "ollama":
        return ollama_body(message)
    if kind == "anthropic":
        return anthropic_body(status, message)
    if isinstance(exc, KilnError):
        return openai_body(status, exc.openai_message(), code=exc.code, param=exc.param)
    return openai_body(status, message)
