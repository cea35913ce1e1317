"""OpenAI's Responses API wire types (``POST /v1/responses``), stateless, as Ollama
serves it: there is no server-side store, so ``previous_response_id``, ``conversation``
and ``item_reference`` inputs are refused (translate.py). Unknown fields are accepted
and ignored (``store``, ``include``, ``metadata``, ``truncation``, ``user``...)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ResponsesRequest(_Wire):
    model: str = ""
    input: str | list[dict[str, Any]] = Field("", description="a string, or message and function-call items")
    instructions: str | None = Field(None, description="a system message before the input")
    tools: list[dict[str, Any]] | None = Field(None, description="{type: function, name, description, parameters}")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = Field(None, description="{format: {type: text|json_object|json_schema, schema}}")
    reasoning: dict[str, Any] | None = Field(None, description="{effort}: thinking on models that have it")
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: StrictBool | None = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    # Chat Completions' sampling fields, taken as kiln extensions (the server/openai rules apply)
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int | None = None
    logit_bias: dict[str, float] | None = None
