"""The engines' per-token log-probabilities (``Chunk.logprobs``) in the shape OpenAI's chat
API and Ollama share: ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``,
and the checks of the request fields both dialects ask for them with."""

from __future__ import annotations

from typing import Any

from server.errors import BadRequest

MAX_TOP_LOGPROBS = 20


def entries(raw: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                              for t in e.get("top") or []]} for e in raw or []]


def wanted(logprobs: bool | None, top: int | None, *, field: str = "top_logprobs") -> int | None:
    """``Inference.logprobs`` from a ``logprobs`` flag and a ``top_logprobs`` count."""
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{field} must be between 0 and {MAX_TOP_LOGPROBS}")
    return (top or 0) if logprobs else None


def bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token id strings -> -100..100); the ids are checked against
    the vocabulary once the model is loaded."""
    if not raw:
        return None
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: keys must be token ids, got {key!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise BadRequest(f"logit_bias: the bias of token {key} must be a number between -100 and 100")
        if tok < 0:
            raise BadRequest(f"logit_bias: token id {tok} is negative")
        out[tok] = float(value)
    return out
