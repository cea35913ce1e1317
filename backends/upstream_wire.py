"""What an upstream engine is sent, and how its stream becomes ``Chunk``s.

Two dialects: ``openai`` (vLLM, OVMS under ``/v3``, llama-server, SMG, LiteLLM) and
``ollama`` (Ollama and other kiln nodes; it keeps ``options``, ``keep_alive``,
``format`` and ``think`` as they are).

Why messages and not the prompt kiln would render: the upstream owns the model, so it
owns its chat template (a remote vLLM may serve a model kiln has no template for), its
tokenizer and its context check. kiln therefore sends what the client asked for —
messages, tools, format and the options after kiln's policy — to the upstream's chat
endpoint, and a raw prompt (``/v1/completions`` with OpenAI's ``prompt``,
``/api/generate`` with Ollama's ``raw``) only where the client sent one. Structured
replies are turned back into the text forms kiln's own parsers read (``<think>`` for
reasoning, Hermes ``<tool_call>`` for calls), so the dialect layers, the loop guard
and the tool/thinking splitters run unchanged over an upstream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from backends.base import Chunk, FinishReason, GenerationRequest, Usage

# Ollama option -> OpenAI parameter. top_k, min_p, typical_p and repeat_penalty are not
# OpenAI's, but llama-server, vLLM and SMG take them as extra fields of the same name.
_OPENAI_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "typical_p": "typical_p", "repeat_penalty": "repeat_penalty", "seed": "seed",
                  "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                  "stop": "stop"}


@dataclass
class UpstreamRequest(GenerationRequest):
    """A ``GenerationRequest`` with what a remote engine needs instead of a rendered
    prompt. ``prompt`` is the client's raw prompt (``raw``) or empty."""

    messages: list[dict[str, Any]] | None = None  # the client's, untemplated
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    format: Any = None  # Ollama's: "json" or a JSON schema
    options: dict[str, Any] = field(default_factory=dict)  # Ollama options after kiln's policy
    keep_alive: float | None = None
    think: Any = None
    system: str | None = None
    suffix: str | None = None
    raw: bool = False
    whole: bool = False  # the client waits for the whole answer: re-sendable until it is complete
    affinity: str | None = None  # the session prefix routing keeps on one replica


def _num_predict(options: dict[str, Any]) -> int | None:
    n = options.get("num_predict")
    return int(n) if isinstance(n, int) and n >= 0 else None


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if fmt is None:
        return None
    if fmt == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt, "strict": True}}


def build(api: str, model: str, req: UpstreamRequest) -> tuple[str, dict[str, Any]]:
    """(path under the replica's base URL, JSON body) of a streamed generation."""
    o = req.options
    if api == "ollama":
        body: dict[str, Any] = {"model": model, "stream": True, "options": dict(o)}
        for key in ("format", "keep_alive", "think"):
            if getattr(req, key) is not None:
                body[key] = getattr(req, key)
        if req.messages is not None:
            body["messages"] = req.messages
            if req.tools:
                body["tools"] = req.tools
            if req.tool_choice is not None:
                body["tool_choice"] = req.tool_choice  # kiln's extension; Ollama ignores it
            return "/api/chat", body
        body.update(prompt=req.prompt, raw=req.raw)
        if req.system is not None:
            body["system"] = req.system
        if req.suffix:
            body["suffix"] = req.suffix
        return "/api/generate", body
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    body.update({_OPENAI_PARAMS[k]: v for k, v in o.items() if k in _OPENAI_PARAMS})
    if _num_predict(o) is not None:
        body["max_tokens"] = _num_predict(o)
    if req.raw:
        body["prompt"] = req.prompt
        if req.suffix:
            body["suffix"] = req.suffix
        return "/completions", body
    messages = req.messages
    if messages is None:  # /api/generate without raw: the upstream's template applies
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                   [{"role": "user", "content": req.prompt}]
    body["messages"] = messages
    if req.tools:
        body["tools"] = req.tools
        if req.tool_choice is not None:
            body["tool_choice"] = req.tool_choice
    fmt = _response_format(req.format)
    if fmt is not None:
        body["response_format"] = fmt
    if isinstance(req.think, str):
        body["reasoning_effort"] = req.think
    return "/chat/completions", body


def embed_body(api: str, model: str, texts: list[str]) -> tuple[str, dict[str, Any]]:
    if api == "ollama":
        return "/api/embed", {"model": model, "input": texts}
    return "/embeddings", {"model": model, "input": texts}


def embed_result(api: str, data: dict[str, Any]) -> tuple[list[list[float]], int]:
    if api == "ollama":
        return data.get("embeddings") or [], int(data.get("prompt_eval_count") or 0)
    rows = sorted(data.get("data") or [], key=lambda d: d.get("index", 0))
    return [r["embedding"] for r in rows], int((data.get("usage") or {}).get("prompt_tokens") or 0)


class UpstreamError(Exception):
    """The upstream reported an error inside its stream."""


def _finish(reason: str | None) -> FinishReason:
    return FinishReason.LENGTH if reason == "length" else FinishReason.STOP


def _hermes(name: str, arguments: Any) -> str:
    """A tool call as the Hermes text kiln's tool parser reads (server/tools.py)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass  # not JSON: kept as text, so the parser drops the call rather than invent one
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


class Decoder:
    """One upstream stream's events -> ``Chunk``s. ``feed`` takes one decoded JSON event
    and returns the chunks it makes; the last has ``finish_reason`` and ``usage``."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.thinking = False  # inside a <think> block we opened
        self.calls: dict[int, dict[str, Any]] = {}  # OpenAI streamed tool calls by index
        self.reason: str | None = None
        self.usage: Usage | None = None
        self.done = False

    def _text(self, thinking: str, content: str) -> str:
        out = ""
        if thinking:
            if not self.thinking:
                out, self.thinking = "<think>", True
            out += thinking
        if content:
            if self.thinking:
                out, self.thinking = out + "</think>", False
            out += content
        return out

    def _close(self) -> Chunk:
        text = "</think>" if self.thinking else ""
        self.thinking = False
        text += "".join(_hermes(c["name"], c["arguments"]) for _, c in sorted(self.calls.items()))
        self.done = True
        return Chunk(text=text, finish_reason=_finish(self.reason), usage=self.usage or Usage())

    def feed(self, event: dict[str, Any]) -> list[Chunk]:
        if "error" in event:
            err = event["error"]
            raise UpstreamError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        return self._ollama(event) if self.api == "ollama" else self._openai(event)

    def end(self) -> list[Chunk]:
        """OpenAI's ``[DONE]``: the stream ended normally."""
        return [] if self.done else [self._close()]

    def _openai(self, event: dict[str, Any]) -> list[Chunk]:
        out: list[Chunk] = []
        if event.get("usage"):
            u = event["usage"]
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            self.usage = Usage(prompt_tokens=int(u.get("prompt_tokens") or 0),
                               completion_tokens=int(u.get("completion_tokens") or 0), cached_tokens=int(cached))
        for choice in event.get("choices") or []:
            delta = choice.get("delta")
            if delta is None:  # /v1/completions
                text = choice.get("text") or ""
            else:
                text = self._text(delta.get("reasoning_content") or delta.get("reasoning") or "",
                                  delta.get("content") or "")
                for tc in delta.get("tool_calls") or []:
                    call = self.calls.setdefault(int(tc.get("index", len(self.calls))), {"name": "", "arguments": ""})
                    fn = tc.get("function") or {}
                    call["name"] += fn.get("name") or ""
                    args = fn.get("arguments")
                    call["arguments"] = args if isinstance(args, dict) else call["arguments"] + (args or "")
            if text:
                out.append(Chunk(text=text, n_tokens=1))
            if choice.get("finish_reason"):
                self.reason = choice["finish_reason"]
        return out

    def _ollama(self, event: dict[str, Any]) -> list[Chunk]:
        msg = event.get("message")
        if msg is not None:
            text = self._text(msg.get("thinking") or "", msg.get("content") or "")
            for tc in msg.get("tool_calls") or []:
                fn = tc.get("function") or {}
                self.calls[len(self.calls)] = {"name": fn.get("name", ""), "arguments": fn.get("arguments", {})}
        else:
            text = self._text(event.get("thinking") or "", event.get("response") or "")
        out = [Chunk(text=text, n_tokens=1)] if text else []
        if event.get("done"):
            if event.get("done_reason") in ("load", "unload"):
                raise UpstreamError(f"the upstream answered {event['done_reason']!r} instead of generating")
            self.reason = event.get("done_reason")
            self.usage = Usage(prompt_tokens=int(event.get("prompt_eval_count") or 0),
                               completion_tokens=int(event.get("eval_count") or 0),
                               prompt_ns=int(event.get("prompt_eval_duration") or 0),
                               eval_ns=int(event.get("eval_duration") or 0))
            out.append(self._close())
        return out


def parse_line(api: str, line: str) -> dict[str, Any] | None | str:
    """One line of the stream: a JSON event, ``"done"`` for OpenAI's ``[DONE]``, or
    ``None`` for what carries nothing (blank lines, SSE comments and fields)."""
    line = line.strip()
    if not line:
        return None
    if api != "ollama":
        if not line.startswith("data:"):
            return None  # ": keep-alive" comments, "event:" lines
        line = line[5:].strip()
        if line == "[DONE]":
            return "done"
    try:
        event = json.loads(line)
    except ValueError:
        raise UpstreamError(f"the upstream sent a line that is not JSON: {line[:80]!r}") from None
    if not isinstance(event, dict):
        raise UpstreamError("the upstream sent a JSON value that is not an object")
    return event
