"""Anthropic's Messages API wire types (``/v1/messages``, ``/v1/messages/count_tokens``),
after the API reference and the ``anthropic`` SDK's ``MessageCreateParams``. Unknown
fields are accepted and ignored (``metadata``, ``service_tier``, ``container``, as a
local server has no use for them); fields kiln cannot honour are refused by translate.py."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class Message(_Wire):
    role: str = Field(description="user or assistant (system text goes in the top-level system)")
    # a string, or content blocks: text, image, tool_use, tool_result, thinking, redacted_thinking
    content: str | list[dict[str, Any]]


class _Common(_Wire):
    model: str = ""
    messages: list[Message] = Field(default_factory=list)
    system: str | list[dict[str, Any]] | None = Field(None, description="a string or a list of text blocks")
    tools: list[dict[str, Any]] | None = Field(None, description="{name, description, input_schema} each")
    tool_choice: dict[str, Any] | None = Field(None, description="{type: auto|any|tool|none, name?}")
    thinking: dict[str, Any] | None = Field(None, description="{type: enabled, budget_tokens} or {type: disabled}")


class MessagesRequest(_Common):
    max_tokens: int | None = Field(None, description="required by Anthropic's API; kiln requires it too")
    stop_sequences: list[str] | None = None
    stream: StrictBool | None = False
    output_config: dict[str, Any] | None = Field(None, description="{format: {type: json_schema, schema}, effort}")
    # Sampling fields: the SDK no longer sends them (2.x), older SDKs and agents still do.
    temperature: float | None = Field(None, description="0 to 1")
    top_p: float | None = None
    top_k: int | None = None


class CountTokensRequest(_Common):
    pass
