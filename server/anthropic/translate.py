"""Anthropic Messages wire <-> the internal ``Inference``: pure functions, no I/O.

Content blocks map onto the chat messages every other dialect uses: ``tool_use``
blocks become an assistant turn's ``tool_calls``, ``tool_result`` blocks ``tool``
messages, ``thinking`` blocks the turn's ``thinking``. The stream is Anthropic's
event sequence (``message_start``, then per content block ``content_block_start``,
``content_block_delta``..., ``content_block_stop``, then ``message_delta`` and
``message_stop``), built by ``MessageStream``."""

from __future__ import annotations

import json
import uuid
from typing import Any

from backends.base import Chunk, FinishReason
from server import options as opts
from server.errors import BadRequest, anthropic_body
from server.inference import Inference, Result
from server.anthropic.protocol import CountTokensRequest, Message, MessagesRequest
from server.tools import ToolCall

# Anthropic's default temperature, used only where neither the model's parameters nor
# the policy set one (and named in X-Kiln-Adjusted), as server/openai does with OpenAI's.
ANTHROPIC_DEFAULTS = {"temperature": 1.0}
MAX_STOP_SEQUENCES = 16


def _text(blocks: str | list[dict[str, Any]] | None, where: str) -> str:
    """The text of a string or a list of text blocks (``system``, a ``tool_result``'s content)."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for b in blocks:
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise BadRequest(f"{where}: only text blocks are supported here, got {kind!r}")
        parts.append(b["text"])
    return "\n".join(parts)


def _image(block: dict[str, Any]) -> str:
    src = block.get("source") or {}
    return str(src.get("data") or src.get("url") or "")


def _user(m: Message, i: int) -> tuple[list[dict[str, Any]], list[str]]:
    """A user turn: its tool results (first, as Anthropic requires them), then its text."""
    if isinstance(m.content, str):
        return [{"role": "user", "content": m.content}], []
    out, texts, images = [], [], []
    for b in m.content:
        kind = b.get("type")
        if kind == "text":
            texts.append(str(b.get("text", "")))
        elif kind == "image":
            images.append(_image(b))
        elif kind == "tool_result":
            content = _text(b.get("content"), f"messages.{i}.content: tool_result")
            if b.get("is_error"):
                content = f"Error: {content}"
            out.append({"role": "tool", "content": content, "tool_call_id": str(b.get("tool_use_id", ""))})
        else:
            raise BadRequest(f"messages.{i}.content: unsupported content block type {kind!r} in a user message")
    if texts or images or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out, images


def _assistant(m: Message, i: int) -> dict[str, Any]:
    if isinstance(m.content, str):
        return {"role": "assistant", "content": m.content}
    texts, thinking, calls = [], [], []
    for b in m.content:
        kind = b.get("type")
        if kind == "text":
            texts.append(str(b.get("text", "")))
        elif kind == "thinking":
            thinking.append(str(b.get("thinking", "")))
        elif kind == "redacted_thinking":
            continue  # encrypted by Anthropic: nothing a local model can read
        elif kind == "tool_use":
            args = b.get("input")
            if not isinstance(args, dict):
                raise BadRequest(f"messages.{i}.content: tool_use.input must be an object")
            calls.append({"id": b.get("id"), "type": "function",
                          "function": {"name": str(b.get("name", "")), "arguments": args}})
        else:
            raise BadRequest(f"messages.{i}.content: unsupported content block type {kind!r} in an assistant "
                             f"message")
    d: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thinking:
        d["thinking"] = "".join(thinking)
    if calls:
        d["tool_calls"] = calls
    return d


def _messages(req: CountTokensRequest | MessagesRequest) -> tuple[list[dict[str, Any]], list[str]]:
    if not req.messages:
        raise BadRequest("messages: at least one message is required")
    out: list[dict[str, Any]] = []
    system = _text(req.system, "system")
    if system:
        out.append({"role": "system", "content": system})
    images: list[str] = []
    for i, m in enumerate(req.messages):
        if m.role == "user":
            turn, imgs = _user(m, i)
            out += turn
            images += imgs
        elif m.role == "assistant":
            out.append(_assistant(m, i))
        else:
            raise BadRequest(f"messages.{i}.role: must be 'user' or 'assistant', got {m.role!r} "
                             f"(system text goes in the top-level system field)")
    return out, images


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise BadRequest(f"tools.{i}: each tool needs a name")
        if t.get("type") not in (None, "custom"):
            raise BadRequest(f"tools.{i}: Anthropic's server tool {t['type']!r} is not available on kiln; "
                             f"define it as a custom tool with an input_schema")
        schema = t.get("input_schema") or {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise BadRequest(f"tools.{i}.input_schema: must be a JSON schema object")
        fn = {"name": t["name"], "parameters": schema}
        if t.get("description"):
            fn["description"] = str(t["description"])
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: dict[str, Any] | None) -> Any:
    if choice is None:
        return None
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise BadRequest("tool_choice: type 'tool' needs a name")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest(f"tool_choice.type: must be auto, any, tool or none, got {kind!r}")


def _think(thinking: dict[str, Any] | None) -> bool | None:
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind in ("enabled", "adaptive", "between_tools"):
        return True  # budget_tokens: a local model's reasoning is bounded by max_tokens alone
    if kind == "disabled":
        return False
    raise BadRequest(f"thinking.type: must be enabled, adaptive, between_tools or disabled, got {kind!r}")


def _format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``output_config.format``: a JSON schema the output is held to (by grammar).
    ``output_config.effort`` is a hint to Claude's own reasoning; a local model has no
    such dial (its ``thinking`` is on or off), so it changes nothing."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise BadRequest("output_config.format: must be {\"type\": \"json_schema\", \"schema\": {...}}")
    return fmt["schema"]


def _range(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise BadRequest(f"{name}: must be between {lo:g} and {hi:g}, got {value:g}")


def _options(req: MessagesRequest) -> dict[str, Any]:
    if req.max_tokens is None:
        raise BadRequest("max_tokens: Field required")
    if req.max_tokens < 1:
        raise BadRequest(f"max_tokens: must be at least 1, got {req.max_tokens}")
    _range("temperature", req.temperature, 0, 1)
    _range("top_p", req.top_p, 0, 1)
    o: dict[str, Any] = {"num_predict": req.max_tokens}
    if req.temperature is not None:
        o["temperature"] = req.temperature
    if req.top_p is not None:
        o["top_p"] = req.top_p
    if req.top_k is not None:
        o["top_k"] = req.top_k
    if req.stop_sequences:
        if len(req.stop_sequences) > MAX_STOP_SEQUENCES:
            raise BadRequest(f"stop_sequences: at most {MAX_STOP_SEQUENCES} sequences")
        o["stop"] = list(req.stop_sequences)
    return opts.check(o)


def to_internal(req: MessagesRequest | CountTokensRequest) -> Inference:
    if not req.model:
        raise BadRequest("model: Field required")
    messages, images = _messages(req)
    options = _options(req) if isinstance(req, MessagesRequest) else {}
    fmt = _format(req.output_config) if isinstance(req, MessagesRequest) else None
    return Inference(model=req.model, messages=messages, options=options, tools=_tools(req.tools), format=fmt,
                     tool_choice=_tool_choice(req.tool_choice), think=_think(req.thinking),
                     images=images or None, fallback=dict(ANTHROPIC_DEFAULTS),
                     fallback_from="Anthropic's default")


# -- the response ---------------------------------------------------------------------

def new_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def stop_reason(r: Result, stops: list[str] | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). The loop guard's stop is ``max_tokens``: the answer
    was cut, not finished."""
    if r.tool_calls:
        return "tool_use", None
    if r.finish in (FinishReason.LENGTH, FinishReason.LOOP):
        return "max_tokens", None
    if r.stop_sequence is not None and r.stop_sequence in (stops or []):
        return "stop_sequence", r.stop_sequence
    return "end_turn", None


def tool_use(c: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": "toolu_" + c.id.removeprefix("call_"), "name": c.name, "input": c.arguments}


def usage(r: Result) -> dict[str, Any]:
    # input_tokens counts the whole prompt: kiln's prefix cache is not Anthropic's
    # prompt caching (no cache_control, nothing written), so no cache_* counts are claimed.
    return {"input_tokens": r.usage.prompt_tokens, "output_tokens": r.usage.completion_tokens}


def message(mid: str, model: str, text: str, r: Result, stops: list[str] | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if r.thinking:
        content.append({"type": "thinking", "thinking": r.thinking, "signature": ""})
    if text:
        content.append({"type": "text", "text": text})
    content += [tool_use(c) for c in r.tool_calls]
    reason, sequence = stop_reason(r, stops)
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage(r)}


class MessageStream:
    """Anthropic's stream events for one generation, as (event name, data) pairs: a
    thinking block and a text block open when their first delta comes, tool calls are
    whole ``tool_use`` blocks at the end (kiln parses them from the finished output)."""

    def __init__(self, model: str, stops: list[str] | None) -> None:
        self.id, self.model, self.stops = new_id(), model, stops
        self.index = -1
        self.open: str | None = None  # the type of the block being streamed

    def start(self, prompt_tokens: int) -> list[tuple[str, dict[str, Any]]]:
        msg: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": msg}), ("ping", {"type": "ping"})]

    def _block(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = self._close()
        self.index += 1
        self.open = kind
        return out + [("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": block})]

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":  # the SDK's accumulator expects a signature; kiln has none to give
            out.append(self._delta({"type": "signature_delta", "signature": ""}))
        self.open = None
        return out + [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def content(self, chunk: Chunk) -> list[tuple[str, dict[str, Any]]]:
        out = []
        if chunk.thinking:
            if self.open != "thinking":
                out += self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": chunk.thinking}))
        if chunk.text:
            if self.open != "text":
                out += self._block("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": chunk.text}))
        return out

    def finish(self, r: Result) -> list[tuple[str, dict[str, Any]]]:
        out = self._close()
        for c in r.tool_calls:
            out += self._block("tool_use", {**tool_use(c), "input": {}})
            out.append(self._delta({"type": "input_json_delta",
                                    "partial_json": json.dumps(c.arguments, ensure_ascii=False)}))
            out += self._close()
        reason, sequence = stop_reason(r, self.stops)
        out.append(("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                      "usage": usage(r)}))
        out.append(("message_stop", {"type": "message_stop"}))
        return out


def stream_error(status: int, message: str) -> tuple[str, dict[str, Any]]:
    return "error", anthropic_body(status, message)
