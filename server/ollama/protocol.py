"""Ollama's native wire types (ollama/ollama api/types.go). Unknown fields are
accepted and ignored, as Ollama's JSON binding does."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool


# ``stream`` is a StrictBool: Go's JSON decoding refuses "yes" or 1 for a bool, where
# pydantic's lax mode would read them as true and stream to a client that asked otherwise.
class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)


class ToolCallFunction(_Wire):
    index: int | None = None
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(_Wire):
    id: str | None = None
    function: ToolCallFunction


class Message(_Wire):
    role: str = Field(description="system, user, assistant or tool")
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


KeepAlive = int | float | str | None
Format = str | dict[str, Any] | None
Think = bool | str | None


class ChatRequest(_Wire):
    model: str = ""
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="kiln extension, as OpenAI's: auto, none, required or {function: {name}}")
    format: Format = None
    options: dict[str, Any] | None = None
    stream: StrictBool | None = Field(None, description="default true")
    keep_alive: KeepAlive = Field(None, description="seconds, a Go duration string, or negative for forever")
    think: Think = None
    truncate: StrictBool | None = Field(
        None, description="true: drop the oldest non-system messages until the prompt fits the context "
                          "(X-Kiln-Adjusted says how many); false or absent: refuse an overlong prompt with 400 "
                          "(unless the model's policy has context_overflow = \"truncate\")")
    shift: StrictBool | None = Field(
        None, description="Ollama shifts a full context during generation; kiln never does: a generation that "
                          "fills the context ends with done_reason \"length\", whatever this says")
    logprobs: bool | None = None
    top_logprobs: int | None = None


class GenerateRequest(_Wire):
    model: str = ""
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = Field(
        None, description="deprecated: the token ids a previous reply returned, prepended to this prompt")
    stream: StrictBool | None = None
    raw: bool | None = None
    format: Format = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    images: list[str] | None = None
    think: Think = None
    truncate: StrictBool | None = Field(None, description="as in ChatRequest (a prompt has no turns to drop)")
    shift: StrictBool | None = Field(None, description="as in ChatRequest")
    logprobs: bool | None = None
    top_logprobs: int | None = None


class EmbedRequest(_Wire):
    model: str = ""
    input: str | list[str] | None = None
    truncate: bool | None = None
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(_Wire):
    model: str = ""
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class ModelRequest(_Wire):
    """show / delete / pull take ``model``, or the legacy ``name``."""

    model: str | None = None
    name: str | None = None
    verbose: bool | None = None
    insecure: bool | None = None
    stream: StrictBool | None = None

    @property
    def target(self) -> str:
        return self.model or self.name or ""


class CopyRequest(_Wire):
    source: str = ""
    destination: str = ""


class CreateRequest(_Wire):
    model: str | None = None
    name: str | None = None
    from_: str | None = Field(None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None
    quantize: str | None = None
    stream: StrictBool | None = None
    modelfile: str | None = None
    policy: dict[str, Any] | None = Field(None, description="kiln extension: the model's generation policy")
