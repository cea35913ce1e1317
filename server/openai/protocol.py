"""OpenAI's wire types for the endpoints kiln serves under ``/v1``. Unknown fields are
accepted; fields whose meaning kiln cannot honour are refused by translate.py."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool


# ``stream`` is a StrictBool: Go's JSON decoding refuses "yes" or 1 for a bool, where
# pydantic's lax mode would read them as true and stream to a client that asked otherwise.
class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ChatMessage(_Wire):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class StreamOptions(_Wire):
    include_usage: bool | None = None


class ChatCompletionRequest(_Wire):
    model: str = ""
    messages: list[ChatMessage] = Field(default_factory=list)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    reasoning_effort: str | None = None
    user: str | None = None


class CompletionRequest(_Wire):
    model: str = ""
    prompt: str | list[Any] | None = None  # text or token ids (translate.py: prompt_input)
    suffix: str | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class EmbeddingRequest(_Wire):
    model: str = ""
    input: str | list[Any] = ""  # texts or token ids (translate.py: embedding_input)
    encoding_format: str | None = "float"
    dimensions: int | None = None
    user: str | None = None
